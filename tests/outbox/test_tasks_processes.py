"""django.tasks on the outbox, across sessions and real worker processes.

PostgreSQL only: another session watches the caller's transaction, and the
worker is a real `run_outbox_worker` woken by NOTIFY.
"""

import time
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection, transaction
from django.tasks import TaskResultStatus
from django.tasks.signals import task_finished, task_started
from django.test import override_settings

from outbox import publish
from outbox.models import OutboxEvent, Status
from outbox.testing import drain
from outbox.worker import Worker
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


def test_run__a_task_that_wrote_is_finished_at_its_own_commit() -> None:
    """Not at the next turn's: a worker that stops first has still told."""
    from outbox.handling import Backoff, run_event

    finished: list[Any] = []

    def receiver(task_result: Any, **kwargs: Any) -> None:
        finished.append(task_result.status)

    tasks.record_then_return.enqueue("own")
    with transaction.atomic():
        [event] = OutboxEvent.objects.claim(
            worker_id="w", limit=1, lease=timedelta(seconds=30)
        )
    task_finished.connect(receiver)
    try:
        run = run_event(event, using="default", backoff=Backoff(1, 1))
    finally:
        task_finished.disconnect(receiver)

    assert run.recorded
    assert finished == [TaskResultStatus.SUCCESSFUL]


def test_worker__slow_receivers_after_a_claim_do_not_start_an_event_since_taken():
    """task_finished receivers run after the turn that also claimed the next
    batch commits: if they outlast its lease, the slot checks the lease
    before starting, and another worker's claim wins. (The first task returns
    nothing and writes nothing, so its end is the turn's to write.)"""
    first = tasks.noop.enqueue()
    second = tasks.add.enqueue(3, 4)
    fast = {"STUCK_TIMEOUT_MS": 200, "BACKOFF_BASE_MS": 1, "BACKOFF_CAP_MS": 5}
    with override_settings(OUTBOX=fast):
        worker = Worker(worker_id="A", batch_size=1)
        other = Worker(worker_id="B", batch_size=1)
    started: list[str] = []
    taken: list[OutboxEvent] = []

    def slow(task_result: Any, **kwargs: Any) -> None:
        if task_result.id == first.id:
            time.sleep(0.4)  # longer than the 200 ms lease of the next batch
            other.rescue_expired()
            taken.extend(other.claim().events)

    def on_start(task_result: Any, **kwargs: Any) -> None:
        started.append(task_result.id)

    task_finished.connect(slow)
    task_started.connect(on_start)
    try:
        worker.run(drain=True)
    finally:
        task_finished.disconnect(slow)
        task_started.disconnect(on_start)

    assert [str(event.uuid) for event in taken] == [second.id]
    assert started == [first.id]  # A never started the second: B holds it
    held = OutboxEvent.objects.get(uuid=second.id)
    assert (held.locked_by, held.attempts) == ("B", 2)


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
