import time

from benchmarks.models import HandlerStart
from outbox import handler
from outbox.models import OutboxEvent


@handler("benchmark.noop")
def do_nothing(event: OutboxEvent) -> None:
    """Return at once, so the benchmark measures the outbox alone."""


@handler("benchmark.clock")
def record_start(event: OutboxEvent) -> None:
    """Record when the handler started (wall clock, same machine)."""
    HandlerStart.objects.create(event_uuid=event.uuid, started_at=time.time())
