"""Invariants 3 and 5: one owner at a time, fenced outcomes, nothing lost."""

import threading
import time

import pytest
from django.db import OperationalError, connection

from outbox import publish
from outbox.models import OutboxEvent, Status
from outbox.runner import Runner, RunOptions
from outbox.worker import Worker
from tests.outbox_app.models import SideEffect

pytestmark = pytest.mark.django_db(transaction=True)


def record_worker(event: OutboxEvent) -> None:
    SideEffect.objects.create(event_uuid=event.uuid, note=event.locked_by)


def run_until_done(worker: Worker, event: OutboxEvent, *, rounds: int = 100) -> None:
    for _ in range(rounds):
        worker.run_once()
        event.refresh_from_db()
        if event.status in (Status.COMPLETED, Status.FAILED):
            return
        time.sleep(0.01)
    raise AssertionError(f"event still {event.status} after {rounds} rounds")


def test_outcome__of_a_worker_that_lost_its_lease_is_not_recorded(
    register_handler, fast_outbox
):
    register_handler("effect", record_worker)
    event = publish("effect", {})
    slow = Worker(worker_id="slow")
    claimed = slow.claim()  # then the worker stalls past its lease
    time.sleep(0.25)

    run_until_done(Worker(worker_id="fresh"), event)
    result = slow.process(claimed)

    assert (result.lost, result.completed) == (1, 0)
    event.refresh_from_db()
    assert (event.status, event.locked_by, event.attempts) == (
        Status.COMPLETED,
        "fresh",
        2,
    )
    assert list(SideEffect.objects.values_list("note", flat=True)) == ["fresh"]


def test_slow_handler__is_not_taken_over_while_its_worker_holds_it(
    register_handler, fast_outbox
):
    started = threading.Event()

    def slow_handler(event: OutboxEvent) -> None:
        started.set()
        time.sleep(0.6)  # three times the 200 ms lease
        record_worker(event)

    register_handler("slow", slow_handler)
    event = publish("slow", {})

    def run_slow_worker() -> None:
        Worker(worker_id="slow").run_once()
        connection.close()

    thread = threading.Thread(target=run_slow_worker)
    thread.start()
    assert started.wait(5)
    time.sleep(0.3)  # the lease has run out, the handler is still running
    rival = Worker(worker_id="rival")
    rescued = rival.rescue_expired()
    claimed = rival.run_once().claimed
    thread.join()

    assert (rescued, claimed) == (0, 0)
    event.refresh_from_db()
    assert (event.status, event.attempts) == (Status.COMPLETED, 1)
    assert list(SideEffect.objects.values_list("note", flat=True)) == ["slow"]


def test_dead_workers_events__are_claimed_again_once_the_lease_expires(
    register_handler, fast_outbox
):
    register_handler("effect", record_worker)
    event = publish("effect", {})
    Worker(worker_id="dead").claim()  # and the process dies

    assert Worker(worker_id="early").run_once().claimed == 0  # lease still valid
    time.sleep(0.25)
    run_until_done(Worker(worker_id="heir"), event)

    assert event.attempts == 2
    assert event.history[0]["error"] == "outbox.errors.LeaseExpired"
    assert event.history[0]["worker"] == "dead"
    assert list(SideEffect.objects.values_list("note", flat=True)) == ["heir"]


def test_event_that_keeps_killing_workers__ends_failed(register_handler, fast_outbox):
    register_handler("poison", record_worker)
    event = publish("poison", {}, max_attempts=3)

    for number in range(3):
        deadline = time.monotonic() + 5
        while not Worker(worker_id=f"victim-{number}").claim():
            assert time.monotonic() < deadline, "event never became claimable"
            Worker(worker_id="lifeline").rescue_expired()
            time.sleep(0.02)
    time.sleep(0.25)
    Worker(worker_id="lifeline").rescue_expired()

    event.refresh_from_db()
    assert event.status == Status.FAILED
    assert event.attempts == 3
    assert [entry["worker"] for entry in event.history] == [
        "victim-0",
        "victim-1",
        "victim-2",
    ]
    assert not SideEffect.objects.exists()


def process_losing_the_connection_at_commit(worker, claimed, monkeypatch) -> None:
    """Run process() on a connection whose COMMIT fails as if it dropped."""

    def lose_the_connection() -> None:
        raise OperationalError("server closed the connection unexpectedly")

    with monkeypatch.context() as patched:
        patched.setattr(connection, "commit", lose_the_connection)
        with pytest.raises(OperationalError):
            worker.process(claimed)


def test_handler_writes__are_lost_with_a_completion_that_fails_to_commit(
    register_handler, monkeypatch
):
    register_handler("effect", record_worker)
    event = publish("effect", {})
    worker = Worker(worker_id="w")
    claimed = worker.claim()

    process_losing_the_connection_at_commit(worker, claimed, monkeypatch)

    event.refresh_from_db()
    assert (event.status, event.locked_by) == (Status.PROCESSING, "w")
    assert not SideEffect.objects.exists()


def test_deferred_constraint__fails_only_the_handler_that_broke_it(register_handler):
    def orphan(event: OutboxEvent) -> None:
        SideEffect.objects.create(event_uuid=event.uuid, parent_id=999_999)

    register_handler("orphan", orphan)
    register_handler("effect", record_worker)
    bad = publish("orphan", {})
    good = [publish("effect", {}) for _ in range(3)]

    result = Worker().run_once()

    assert (result.completed, result.retried) == (3, 1)
    bad.refresh_from_db()
    assert "ForeignKeyViolation" in bad.last_error or "foreign key" in bad.last_error
    assert SideEffect.objects.filter(event_uuid__in=[e.uuid for e in good]).count() == 3


def test_batch_claimed_ahead__is_lost_with_a_commit_that_fails(
    register_handler, monkeypatch
):
    register_handler("effect", record_worker)
    publish("effect", {})
    later = publish("effect", {})
    worker = Worker(worker_id="w", batch_size=1)
    claimed = worker.claim()

    process_losing_the_connection_at_commit(worker, claimed, monkeypatch)

    later.refresh_from_db()
    assert (later.status, later.attempts) == (Status.PENDING, 0)
    assert worker.release_claimed_ahead() == 0


def heartbeat_and_tick(runner, seconds=1.5):
    """What Runner does: the heartbeat extends leases every lease/3; ticks run."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        runner._extend_leases()
        try:
            runner._tick()
        except Exception:
            runner._discard_broken_connection()
        time.sleep(0.05)


def test_heartbeat__lets_the_lease_of_a_batch_lost_with_its_transaction_lapse(
    register_handler, fast_outbox
):
    calls = []

    def handler(event):
        calls.append(event.pk)
        if len(calls) == 1:  # the DB restarts / idle timeout kills the session
            with connection.cursor() as c:
                c.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        record_worker(event)

    register_handler("effect", handler)
    event = publish("effect", {})
    worker = Worker(worker_id="w")  # lease 200 ms
    runner = Runner(worker, RunOptions(poll_ms=50, listen=False))
    try:
        with pytest.raises(OperationalError):
            worker.run_once()
        runner._discard_broken_connection()
        heartbeat_and_tick(runner)  # 7 lease periods
    finally:
        runner.waiter.close()
    event.refresh_from_db()
    assert event.status == Status.COMPLETED, (event.status, event.locked_until)


def test_heartbeat__lets_a_batch_claimed_ahead_by_an_ambiguous_commit_lapse(
    register_handler, fast_outbox, monkeypatch
):
    register_handler("effect", record_worker)
    publish("effect", {})
    later = publish("effect", {})
    worker = Worker(worker_id="w", batch_size=1)
    runner = Runner(worker, RunOptions(poll_ms=50, listen=False))
    claimed = worker.claim()
    real_commit = connection.commit

    def commit_then_lose_the_reply():
        real_commit()
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(connection, "commit", commit_then_lose_the_reply)
    with pytest.raises(OperationalError):
        worker.process(claimed)
    monkeypatch.undo()
    try:
        assert worker._claimed_ahead == []
        heartbeat_and_tick(runner)
    finally:
        runner.waiter.close()
    later.refresh_from_db()
    assert later.status == Status.COMPLETED, (later.status, later.locked_by)
