"""django.tasks on the outbox, across sessions and real worker processes.

PostgreSQL only: another session watches the caller's transaction, and the
worker is a real `run_outbox_worker` woken by NOTIFY.
"""

import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection, transaction
from django.tasks import TaskResultStatus
from django.tasks.signals import task_finished

from outbox import publish
from outbox.models import OutboxEvent, Status
from outbox.testing import drain
from tests.outbox.sessions import InThread
from tests.outbox.worker_process import WorkerProcess, wait_until
from tests.outbox_app import tasks

pytestmark = pytest.mark.django_db(transaction=True)


def count_elsewhere() -> int:
    return InThread(lambda: OutboxEvent.objects.count()).join()


@pytest.mark.django_db(transaction=True)
def test_enqueue__commits_with_the_caller_and_not_before() -> None:
    """Another session sees the task only once the caller commits."""

    def count_elsewhere() -> int:
        return InThread(lambda: OutboxEvent.objects.count()).join()

    with transaction.atomic():
        tasks.add.enqueue(1, 2)
        assert OutboxEvent.objects.count() == 1
        assert count_elsewhere() == 0

    assert count_elsewhere() == 1


@pytest.mark.django_db(transaction=True)
def test_enqueue__outside_a_transaction_commits_at_once() -> None:
    assert connection.get_autocommit()

    tasks.add.enqueue(1, 2)

    assert InThread(lambda: OutboxEvent.objects.count()).join() == 1


def test_signals__a_task_whose_commit_fails_is_never_finished_successful() -> None:
    """task_finished waits for the end to commit: here the COMMIT fails."""
    finished: list[Any] = []

    def receiver(task_result: Any, **kwargs: Any) -> None:
        finished.append(task_result.status)

    result = tasks.fails_at_commit.using(max_attempts=1).enqueue()  # type: ignore[call-arg]
    task_finished.connect(receiver)
    try:
        drain()
    finally:
        task_finished.disconnect(receiver)

    assert finished == [TaskResultStatus.FAILED]
    found = tasks.fails_at_commit.get_result(result.id)
    assert found.status == TaskResultStatus.FAILED
    assert found.errors[0].exception_class_path == "django.db.utils.IntegrityError"


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.kill()


@pytest.mark.slow
def test_worker__runs_tasks_and_events_woken_at_commit(workers) -> None:
    """One run_outbox_worker runs both, woken by the commit, not its poll."""
    worker = WorkerProcess("--poll-ms", "60000", "--worker-id", "both")
    workers.append(worker)
    worker.wait_for_output("outbox worker started")
    time.sleep(0.3)  # LISTENing

    with transaction.atomic():
        result = tasks.add.enqueue(20, 22)
        publish("outbox_testapp.record", {})

    took = wait_until(
        lambda: OutboxEvent.objects.filter(status=Status.COMPLETED).count() == 2,
        context=lambda: worker.output,
    )
    assert took < 30  # under the 60 s poll: woken by the commit
    found = tasks.add.get_result(result.id)
    assert found.status == TaskResultStatus.SUCCESSFUL
    assert found.return_value == 42
    assert found.worker_ids == ["both"]
    assert worker.stop() == 0


@pytest.mark.slow
def test_worker__queue_option_limits_it_to_those_queues(workers) -> None:
    reports = tasks.in_reports_queue.enqueue(7)
    default = tasks.add.enqueue(1, 1)
    event = publish("outbox_testapp.record", {}, queue="reports")

    worker = WorkerProcess("--queue", "reports", "--drain", "--worker-id", "r")
    workers.append(worker)

    assert worker.wait() == 0, worker.output
    assert "queues=reports" in worker.output
    assert tasks.in_reports_queue.get_result(reports.id).return_value == 7
    assert OutboxEvent.objects.get(pk=event.pk).status == Status.COMPLETED
    assert tasks.add.get_result(default.id).status == TaskResultStatus.READY
