"""django.tasks tasks for the outbox's task backend tests (outbox.tasks).

Run by drain() in the tests and by real `run_outbox_worker` processes, which
import them by their dotted path.
"""

import asyncio
import datetime
import uuid
from typing import Any

from django.tasks import TaskContext, task

from outbox import PermanentFailure, Retry
from tests.outbox_app.models import HandlerRun, SideEffect


@task
def add(a: int, b: int) -> int:
    return a + b


@task
def noop() -> None:
    """Do nothing: the benchmark's and the latency test's task."""


@task
def record(label: str) -> None:
    """Write one row per run that commits, named by label."""
    HandlerRun.objects.create(event_uuid=uuid.uuid4(), worker=label)


@task
def record_then_return(label: str) -> dict[str, Any]:
    """Write a row and return a value: both commit with the completion, or neither."""
    HandlerRun.objects.create(event_uuid=uuid.uuid4(), worker=label)
    return {"label": label, "tuple": (1, 2)}


@task(takes_context=True)
def attempt_number(context: TaskContext) -> int:
    """Return the attempt this run is, failing the first two."""
    if context.attempt < 3:
        raise ConnectionError(f"attempt {context.attempt} failed")
    return context.attempt


@task
def fails_at_commit() -> int:
    """Write a row whose deferred foreign key fails the transaction's COMMIT."""
    SideEffect.objects.create(event_uuid=uuid.uuid4(), parent_id=2**62)
    return 1


@task
def refused(address: str) -> None:
    raise ConnectionError(f"the server refused {address}")


@task
def always_fails() -> None:
    raise ValueError("this task always fails")


@task
def gives_up() -> None:
    raise PermanentFailure("the input is wrong; retrying will not help")


@task
def retry_in_an_hour() -> None:
    raise Retry(after=datetime.timedelta(hours=1))


@task
async def async_add(a: int, b: int) -> int:
    await asyncio.sleep(0)
    return a + b


@task
def returns_a_datetime() -> datetime.datetime:
    return datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


@task(key="reports", max_attempts=2)  # type: ignore[call-overload]
def keyed_report(n: int) -> int:
    """A task with the outbox's options given to @task."""
    HandlerRun.objects.create(event_uuid=uuid.uuid4(), worker=f"report-{n}")
    return n


@task(queue_name="reports")
def in_reports_queue(n: int) -> int:
    return n


def _renamed() -> None:
    """Decorated under another name: its path names the plain function."""


renamed = task(_renamed)
