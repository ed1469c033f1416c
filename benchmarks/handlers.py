import asyncio
import time

from benchmarks.models import HandlerStart
from outbox import handler
from outbox.models import OutboxEvent


@handler("benchmark.noop")
def do_nothing(event: OutboxEvent) -> None:
    """Return at once, so the benchmark measures the outbox alone."""


@handler("benchmark.fanout")
def do_nothing_first(event: OutboxEvent) -> None:
    """One of benchmark.fanout's two subscribers; returns at once."""


@handler("benchmark.fanout", name="second")
def do_nothing_second(event: OutboxEvent) -> None:
    """The other: each benchmark.fanout event is two rows, two runs."""


@handler("benchmark.clock")
def record_start(event: OutboxEvent) -> None:
    """Record when the handler started (wall clock, same machine)."""
    HandlerStart.objects.create(event_uuid=event.uuid, started_at=time.time())


@handler("benchmark.io")
def wait_on_io(event: OutboxEvent) -> None:
    """Wait 20 ms, as an SMTP send or an HTTP call would, touching no table."""
    time.sleep(0.020)


@handler("benchmark.io_async")
async def wait_on_io_async(event: OutboxEvent) -> None:
    """benchmark.io as a coroutine: asyncio.sleep instead of time.sleep."""
    await asyncio.sleep(0.020)
