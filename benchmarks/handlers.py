from outbox import handler
from outbox.models import OutboxEvent


@handler("benchmark.noop")
def do_nothing(event: OutboxEvent) -> None:
    """Return at once, so the benchmark measures the outbox alone."""
