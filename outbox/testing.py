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

from collections.abc import Callable, Collection, Iterator
from typing import Any

from outbox.recording import BatchResult
from outbox.worker import Worker

DRAIN_WORKER_ID = "outbox-testing-drain"


def drain(
    *,
    max_events: int | None = None,
    batch_size: int | None = None,
    queues: Collection[str] = (),
) -> BatchResult:
    """Handle events (and tasks) until none is ready; return what was done.

    Runs the worker's own loop in this thread, on this thread's connection,
    one handler at a time; given queues, only those queues' events, as
    run_outbox_worker --queue would. Events scheduled for a later retry are
    not ready, so drain() returns without waiting for them: a failing
    handler shows up as result.retried.
    """
    worker = Worker(
        worker_id=DRAIN_WORKER_ID,
        batch_size=batch_size,
        concurrency=1,
        queues=queues,
    )
    return worker.run(drain=True, max_events=max_events)


try:
    import pytest
except ImportError:  # pragma: no cover - pytest is optional for drain()
    pass
else:

    @pytest.fixture
    def outbox_drain(db: Any) -> Iterator[Callable[..., BatchResult]]:
        """Return drain(), with database access enabled."""
        yield drain
