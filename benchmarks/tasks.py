"""django.tasks tasks for the benchmark's tasks workload, on both backends.

"default" is the outbox's OutboxTaskBackend, "db" django-tasks-db's
DatabaseBackend (benchmarks/settings.py). Each task is defined once per
backend, so each backend's worker runs its own: run_outbox_worker the
first, `manage.py db_worker --backend db` the second.
"""

import time
import uuid

from django.tasks import TaskContext, task

from benchmarks.models import HandlerStart


@task
def noop() -> None:
    """Return at once: the drain measures the backend alone."""


@task(backend="db")
def db_noop() -> None:
    """noop() on django-tasks-db."""


@task(takes_context=True)
def clock(context: TaskContext) -> None:
    """Record when the task started (wall clock, same machine)."""
    _record(context)


@task(backend="db", takes_context=True)
def db_clock(context: TaskContext) -> None:
    """clock() on django-tasks-db."""
    _record(context)


def _record(context: TaskContext) -> None:
    HandlerStart.objects.create(
        event_uuid=uuid.UUID(context.task_result.id), started_at=time.time()
    )
