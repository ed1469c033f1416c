from typing import ClassVar

from django.db import models


class SideEffect(models.Model):
    """A database write made by a test handler: at most one per event."""

    event_uuid = models.UUIDField()
    note = models.CharField(max_length=100, blank=True, default="")
    # A foreign key, which Django makes DEFERRABLE INITIALLY DEFERRED.
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.CASCADE)

    class Meta:
        constraints: ClassVar = [
            models.UniqueConstraint(
                fields=("event_uuid",), name="one_effect_per_event"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.note or 'effect'} of {self.event_uuid}"


class HandlerRun(models.Model):
    """A database write made by a test handler, with no uniqueness: every run
    that commits leaves a row, so a repeated database effect shows up."""

    event_uuid = models.UUIDField()
    worker = models.CharField(max_length=200)

    def __str__(self) -> str:
        return f"run of {self.event_uuid} by {self.worker}"
