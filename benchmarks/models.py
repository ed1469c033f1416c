from django.db import models


class HandlerStart(models.Model):
    """When a handler started, to measure commit-to-handler latency."""

    event_uuid = models.UUIDField(unique=True)
    started_at = models.FloatField()

    def __str__(self) -> str:
        return f"{self.event_uuid} at {self.started_at}"
