import time
from datetime import timedelta

import pytest
from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from outbox import PermanentFailure, Retry, publish
from outbox.models import OutboxEvent, Status
from outbox.worker import Worker
from tests.outbox.sessions import connect, open_transaction
from tests.outbox_app.models import SideEffect

pytestmark = pytest.mark.django_db


def write_effect(event: OutboxEvent) -> None:
    SideEffect.objects.create(event_uuid=event.uuid)


def fail_with(error: Exception):
    def handler(event: OutboxEvent) -> None:
        raise error

    return handler


@pytest.mark.sqlite
def test_run_once__completes_events_and_keeps_handler_writes(register_handler):
    register_handler("effect", write_effect)
    events = [publish("effect", {"n": n}) for n in range(3)]

    result = Worker(worker_id="w1").run_once()

    assert (result.claimed, result.completed) == (3, 3)
    for event in events:
        event.refresh_from_db()
        assert event.status == Status.COMPLETED
        assert event.attempts == 1
        assert event.completed_at is not None
        assert event.locked_until is None
        assert event.locked_by == "w1"
    assert SideEffect.objects.count() == 3


@pytest.mark.sqlite
def test_run_once__claims_at_most_batch_size_oldest_first(register_handler):
    register_handler("noop", lambda event: None)
    events = [publish("noop", {}) for _ in range(5)]

    result = Worker(batch_size=2).run_once()

    assert result.claimed == 2
    done = OutboxEvent.objects.filter(status=Status.COMPLETED)
    assert set(done) == set(events[:2])


@pytest.mark.sqlite
def test_run_once__nothing_ready_claims_nothing() -> None:
    publish("later", {}, available_at=timezone.now() + timedelta(hours=1))

    assert Worker().run_once().claimed == 0


@pytest.mark.sqlite
def test_failure__is_retried_with_backoff_and_its_error_kept(register_handler):
    register_handler("flaky", fail_with(ConnectionError("smtp said no")))
    event = publish("flaky", {"secret": "never-in-history"})
    before = timezone.now()

    result = Worker(worker_id="w1").run_once()

    event.refresh_from_db()
    assert result.retried == 1
    assert event.status == Status.PENDING
    assert event.attempts == 1
    # First retry: between half and all of the 1 s base.
    assert before + timedelta(milliseconds=400) < event.available_at
    assert event.available_at < timezone.now() + timedelta(seconds=2)
    assert event.last_error == "ConnectionError: smtp said no"
    [entry] = event.history
    assert entry["attempt"] == 1
    assert entry["worker"] == "w1"
    assert entry["error"] == "ConnectionError"
    assert entry["message"] == "smtp said no"
    assert "never-in-history" not in str(event.history)


@pytest.mark.sqlite
def test_failure__handler_writes_are_rolled_back(register_handler):
    def write_then_fail(event: OutboxEvent) -> None:
        write_effect(event)
        raise RuntimeError("after the write")

    register_handler("half", write_then_fail)
    register_handler("effect", write_effect)
    failing = publish("half", {})
    passing = publish("effect", {})

    Worker().run_once()

    assert list(SideEffect.objects.values_list("event_uuid", flat=True)) == [
        passing.uuid
    ]
    failing.refresh_from_db()
    assert failing.status == Status.PENDING


def test_failure__handler_that_swallows_a_database_error_is_retried(register_handler):
    def swallow(event: OutboxEvent) -> None:
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1/0")
        except DatabaseError:
            pass  # the transaction is now aborted

    register_handler("swallow", swallow)
    register_handler("effect", write_effect)
    broken = publish("swallow", {})
    fine = publish("effect", {})

    result = Worker().run_once()

    assert (result.completed, result.retried) == (1, 1)
    broken.refresh_from_db()
    assert broken.status == Status.PENDING
    assert "current transaction is aborted" in broken.last_error
    assert SideEffect.objects.filter(event_uuid=fine.uuid).exists()


@pytest.mark.sqlite
def test_failure__atomic_without_savepoint_in_a_handler_does_not_doom_the_batch(
    register_handler,
):
    def doomed(event: OutboxEvent) -> None:
        with transaction.atomic(savepoint=False):
            raise RuntimeError("inside atomic")

    register_handler("doomed", doomed)
    register_handler("effect", write_effect)
    publish("doomed", {})
    fine = publish("effect", {})

    result = Worker().run_once()

    assert (result.completed, result.retried) == (1, 1)
    assert SideEffect.objects.filter(event_uuid=fine.uuid).exists()


@pytest.mark.sqlite
def test_permanent_failure__ends_failed_at_once(register_handler):
    register_handler("bad", fail_with(PermanentFailure("malformed payload")))
    event = publish("bad", {})

    result = Worker().run_once()

    event.refresh_from_db()
    assert result.failed == 1
    assert event.status == Status.FAILED
    assert event.attempts == 1
    assert event.last_error == "outbox.errors.PermanentFailure: malformed payload"


@pytest.mark.sqlite
def test_retry__uses_the_requested_delay(register_handler):
    register_handler("later", fail_with(Retry(after=timedelta(minutes=5))))
    event = publish("later", {})

    Worker().run_once()

    event.refresh_from_db()
    delay = event.available_at - timezone.now()
    assert timedelta(minutes=4) < delay <= timedelta(minutes=5)
    assert event.history[0]["error"] == "outbox.errors.Retry"


def test_retry__rejects_a_negative_delay() -> None:
    with pytest.raises(ValueError, match="zero or more"):
        Retry(after=timedelta(seconds=-1))


@pytest.mark.sqlite
def test_failure__ends_failed_once_attempts_are_used_up(register_handler, fast_outbox):
    register_handler("flaky", fail_with(ValueError("nope")))
    event = publish("flaky", {}, max_attempts=3)
    worker = Worker()

    for _ in range(50):
        worker.run_once()
        event.refresh_from_db()
        if event.status == Status.FAILED:
            break
        time.sleep(0.005)

    assert event.status == Status.FAILED
    assert event.attempts == 3
    assert [entry["attempt"] for entry in event.history] == [1, 2, 3]


@pytest.mark.sqlite
def test_no_handler__is_retried_then_failed_never_completed(fast_outbox):
    event = publish("nobody.listens", {}, max_attempts=2)
    worker = Worker()

    worker.run_once()
    event.refresh_from_db()
    assert event.status == Status.PENDING
    time.sleep(0.01)
    worker.run_once()
    event.refresh_from_db()

    assert event.status == Status.FAILED
    assert event.completed_at is None
    assert event.last_error == (
        "outbox.errors.HandlerNotFound: no handler registered for 'nobody.listens'"
    )


@pytest.mark.sqlite
def test_history__keeps_the_latest_entries_and_truncates_messages(register_handler):
    register_handler("loud", fail_with(ValueError("x" * 5000)))
    event = publish("loud", {}, max_attempts=100)
    event.history = [{"attempt": n} for n in range(30)]
    event.save(update_fields=["history"])

    Worker().run_once()

    event.refresh_from_db()
    assert len(event.history) == 25
    assert len(event.history[-1]["message"]) == 1000
    assert event.history[-1]["message"].endswith("…")


@pytest.mark.sqlite
def test_stop_requested__releases_unstarted_events_uncharged(register_handler):
    worker = Worker()

    def stop_after_this(event: OutboxEvent) -> None:
        worker.stop_requested.set()

    register_handler("stopper", stop_after_this)
    first = publish("stopper", {})
    rest = [publish("stopper", {}) for _ in range(3)]

    result = worker.run_once()

    assert (result.completed, result.released) == (1, 3)
    first.refresh_from_db()
    assert first.status == Status.COMPLETED
    for event in rest:
        event.refresh_from_db()
        assert (event.status, event.attempts, event.locked_by) == (
            Status.PENDING,
            0,
            "",
        )


def test_backoff__grows_exponentially_with_jitter_and_a_cap() -> None:
    worker = Worker()

    for attempt, ceiling in [(1, 1), (2, 2), (3, 4), (7, 60), (40, 60)]:
        delays = [worker.backoff.delay(attempt).total_seconds() for _ in range(50)]
        assert all(ceiling / 2 <= delay <= ceiling for delay in delays)
        assert len(set(delays)) > 1


@pytest.mark.django_db(transaction=True)
def test_turn__records_a_batch_and_claims_the_next_in_one_transaction(
    register_handler,
):
    """One commit per batch: the outcomes and the next claim share a transaction.

    PostgreSQL stamps each row with the transaction that last wrote it (xmin).
    """
    stamps: list[str] = []

    def note_who_wrote_the_first_four(event: OutboxEvent) -> None:
        if event.pk == events[2].pk:
            with connect() as session:
                stamps.extend(
                    row[0]
                    for row in session.execute(
                        "SELECT xmin::text FROM outbox_outboxevent WHERE id = ANY(%s)"
                        " ORDER BY id",
                        [[e.pk for e in events[:4]]],
                    )
                )

    register_handler("noop", note_who_wrote_the_first_four)
    events = [publish("noop", {}) for _ in range(5)]

    result = Worker(worker_id="w", batch_size=2).run(drain=True)

    assert (result.claimed, result.completed) == (5, 5)
    assert len(stamps) == 4 and len(set(stamps)) == 1, stamps


def claim_one_for_the_holder():
    return OutboxEvent.objects.claim(
        worker_id="holder", limit=1, lease=timedelta(seconds=60)
    )


@pytest.mark.django_db(transaction=True)
def test_claim__skips_events_another_claim_holds_without_waiting():
    """A claim in flight holds its rows; a second claimer takes the others at once.

    Without FOR UPDATE the second claimer would take the held row too (and
    overwrite its lease when the first commits); without SKIP LOCKED it would
    wait for the first. A lock timeout turns either into an error.
    """
    held, free = publish("x", {}), publish("x", {})

    try:
        with open_transaction(claim_one_for_the_holder):
            with connection.cursor() as cursor:
                cursor.execute("SET lock_timeout = '2s'")
            claimed = Worker(worker_id="rival", batch_size=10).claim()
    finally:
        connection.close()  # forget the session's lock timeout

    assert [event.pk for event in claimed] == [free.pk]
    held.refresh_from_db()
    assert (held.status, held.locked_by, held.attempts) == (
        Status.PROCESSING,
        "holder",
        1,
    )


@pytest.mark.django_db(transaction=True)
def test_claim_of_several_queues__skips_events_another_claim_holds() -> None:
    """Each queue's read in the merged claim locks with SKIP LOCKED too."""
    held = publish("x", {}, queue="a")
    free = [publish("x", {}, queue=name) for name in ("b", "a")]

    def hold_one() -> object:
        return OutboxEvent.objects.claim(
            worker_id="holder", limit=1, lease=timedelta(seconds=60), queues=["a"]
        )

    try:
        with open_transaction(hold_one):
            with connection.cursor() as cursor:
                cursor.execute("SET lock_timeout = '2s'")
            claimed = Worker(
                worker_id="rival", batch_size=10, queues=["a", "b"]
            ).claim()
    finally:
        connection.close()  # forget the session's lock timeout

    assert sorted(event.pk for event in claimed) == sorted(e.pk for e in free)
    held.refresh_from_db()
    assert (held.locked_by, held.attempts) == ("holder", 1)
