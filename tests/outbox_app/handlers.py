"""Handlers found by the outbox's autodiscovery, used by the worker tests.

The worker tests run real `run_outbox_worker` processes, which find these
through the same discovery as any project's handlers.
"""

import time
from pathlib import Path

from outbox import handler
from outbox.models import OutboxEvent
from tests.outbox_app.models import SideEffect


@handler("outbox_testapp.discovered")
def record_discovery(event: OutboxEvent) -> None:
    SideEffect.objects.create(event_uuid=event.uuid, note="discovered")


@handler("outbox_testapp.record")
def record_worker(event: OutboxEvent) -> None:
    """Write one row naming the worker; a second run would hit the constraint."""
    SideEffect.objects.create(event_uuid=event.uuid, note=event.locked_by)


@handler("outbox_testapp.sleep")
def sleep_then_record(event: OutboxEvent) -> None:
    """Touch payload['started_file'], sleep payload['seconds'], then record."""
    if started_file := event.payload.get("started_file"):
        Path(started_file).touch()
    time.sleep(event.payload["seconds"])
    SideEffect.objects.create(event_uuid=event.uuid, note=event.locked_by)


@handler("outbox_testapp.clock")
def record_start_time(event: OutboxEvent) -> None:
    """Record when the handler started, to measure commit-to-handler latency."""
    SideEffect.objects.create(event_uuid=event.uuid, note=repr(time.time()))
