from collections.abc import Iterator

import pytest
from django.test import override_settings

from tests.outbox.worker_process import WorkerProcess

#: Settings that keep the claimer's timings short enough for tests.
FAST = {"BACKOFF_BASE_MS": 1, "BACKOFF_CAP_MS": 5, "STUCK_TIMEOUT_MS": 200}


@pytest.fixture
def fast_outbox():
    """Retry at once and let leases expire in 200 ms."""
    with override_settings(OUTBOX=FAST):
        yield FAST


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    """Start workers with workers.append(...); kill any left at the end."""
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.kill()
