"""Helpers for a project's own tests: run the outbox in-process.

    from outbox.testing import drain

    def test_invite_sends_email(mailoutbox):
        invite_member(...)
        drain()
        assert len(mailoutbox) == 1

With pytest, add ``pytest_plugins = ["outbox.testing"]`` to conftest.py to get
the ``outbox_drain`` fixture. drain() works inside a test's transaction (no
real commit is needed) and in transactional tests alike.
"""

from collections.abc import Callable, Iterator
from typing import Any

from outbox.worker import BatchResult, Worker

DRAIN_WORKER_ID = "outbox-testing-drain"


def drain(
    *, max_events: int | None = None, batch_size: int | None = None
) -> BatchResult:
    """Handle events until none is ready; return what was done.

    Events scheduled for a later retry are not ready, so drain() returns
    without waiting for them: a failing handler shows up as result.retried.
    """
    worker = Worker(worker_id=DRAIN_WORKER_ID, batch_size=batch_size)
    total = BatchResult()
    try:
        while max_events is None or total.claimed < max_events:
            if max_events is not None:
                worker.batch_size = min(worker.batch_size, max_events - total.claimed)
            result = worker.run_once()
            if not result.claimed:
                break
            total += result
    finally:
        total.released += worker.release_claimed_ahead()
    return total


try:
    import pytest
except ImportError:  # pragma: no cover - pytest is optional for drain()
    pass
else:

    @pytest.fixture
    def outbox_drain(db: Any) -> Iterator[Callable[..., BatchResult]]:
        """Return drain(), with database access enabled."""
        yield drain
