from django.core.serializers.json import DjangoJSONEncoder
from django.db import models


class HandlerStart(models.Model):
    """When a handler started, to measure commit-to-handler latency."""

    event_uuid = models.UUIDField(unique=True)
    started_at = models.FloatField()

    def __str__(self) -> str:
        return f"{self.event_uuid} at {self.started_at}"


class BareRow(models.Model):
    """A row the size of an outbox event, inserted with the bare ORM.

    publish() is measured next to inserting this, in the same loop, so the
    ratio shows what the outbox adds over the insert itself.
    """

    event_type = models.CharField(max_length=200)
    payload = models.JSONField(encoder=DjangoJSONEncoder)
    max_attempts = models.PositiveIntegerField(default=10)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.event_type
