"""Operators' retry and discard (outbox.operations), which the admin calls."""

import threading
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from outbox import operations, ordering, publish
from outbox.models import OutboxEvent, Status
from outbox.operations import discard_events, retry_events
from outbox.testing import drain
from outbox.worker import Worker
from tests.outbox.factories import OutboxEventFactory
from tests.outbox.listening import listen, notifications
from tests.outbox.sessions import InThread, open_transaction

pytestmark = [pytest.mark.django_db]


def ready_ids() -> list[int]:
    return list(OutboxEvent.objects.ready().values_list("id", flat=True))


def fail(event: OutboxEvent) -> None:
    OutboxEvent.objects.filter(pk=event.pk).update(
        status=Status.FAILED, attempts=event.max_attempts, waiting=False
    )


def lock_waits() -> int:
    """Count the other sessions of the test database waiting for a lock.

    pg_stat_activity rather than pg_locks: a row lock is waited for as a
    transaction id, which pg_locks ties to no database, and other test runs
    share the server. The test database is this run's own.
    """
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            " AND pid <> pg_backend_pid()"
        )
        return cursor.fetchone()[0]


def finished_or_blocked(session: InThread, *, timeout: float = 5.0) -> str:
    """Wait until session has finished or a session waits for a lock; say which."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not session.thread.is_alive():
            return "finished"
        if lock_waits():
            return "blocked"
        time.sleep(0.005)
    pytest.fail(f"neither finished nor waiting for a lock after {timeout}s")


def wait_until_blocked(session: InThread) -> None:
    """Return once session waits for a lock: the race really happened."""
    assert finished_or_blocked(session) == "blocked", "it never waited for a lock"
    assert session.thread.is_alive()


def claim_one() -> list[OutboxEvent]:
    return list(Worker(worker_id="w", batch_size=1).claim())


@pytest.fixture
def handled(register_handler) -> list[str]:
    seen: list[str] = []
    register_handler("step", lambda event: seen.append(event.payload["name"]))
    return seen


@pytest.mark.sqlite
def test_retry_events__makes_a_failed_event_pending_now_with_fresh_attempts() -> None:
    event = OutboxEventFactory.create(
        failed=True, available_at=timezone.now() - timedelta(days=1)
    )

    result = retry_events([event.pk], actor="ops@example.com")

    event.refresh_from_db()
    assert result.changed == [event.pk]
    assert (event.status, event.attempts, event.locked_by) == (Status.PENDING, 0, "")
    assert ready_ids() == [event.pk]
    assert event.available_at > timezone.now() - timedelta(minutes=1)


@pytest.mark.sqlite
def test_retry_events__keeps_the_history_and_records_who_retried() -> None:
    event = OutboxEventFactory.create(failed=True)

    retry_events([event.pk], actor="ops@example.com")

    event.refresh_from_db()
    assert [entry.get("error") for entry in event.history] == ["ConnectionError", None]
    assert event.history[-1]["operator"] == "ops@example.com"
    assert event.history[-1]["action"] == "retried"
    assert event.last_error == "ConnectionError: smtp down"


@pytest.mark.sqlite
def test_retry_events__brings_forward_an_event_waiting_for_its_retry() -> None:
    later = timezone.now() + timedelta(hours=1)
    event = OutboxEventFactory.create(attempts=3, available_at=later)

    result = retry_events(OutboxEvent.objects.all(), actor="ops")

    assert result.changed == [event.pk]
    assert ready_ids() == [event.pk]


@pytest.mark.sqlite
def test_retry_events__skips_what_it_must_not_touch_and_says_why() -> None:
    completed = OutboxEventFactory.create(completed=True)
    leased = OutboxEventFactory.create(leased=True)
    expired = OutboxEventFactory.create(
        leased=True, locked_until=timezone.now() - timedelta(seconds=1)
    )
    fresh = OutboxEventFactory.create()
    discarded = OutboxEventFactory.create(failed=True)
    discard_events([discarded.pk], actor="ops")
    failed = OutboxEventFactory.create(failed=True)
    before = {
        row.pk: (row.status, row.attempts, row.locked_until)
        for row in OutboxEvent.objects.exclude(pk=failed.pk)
    }

    result = retry_events(OutboxEvent.objects.all(), actor="ops")

    assert result.changed == [failed.pk]
    assert result.skipped == {
        operations.COMPLETED: 1,
        operations.LIVE_LEASE: 1,
        operations.EXPIRED_LEASE: 1,
        operations.NOT_RETRYING: 1,
        operations.DISCARDED: 1,
    }
    after = {
        row.pk: (row.status, row.attempts, row.locked_until)
        for row in OutboxEvent.objects.exclude(pk=failed.pk)
    }
    assert after == before
    assert {completed.pk, leased.pk, expired.pk, fresh.pk} < set(after)


@pytest.mark.sqlite
def test_retry_events__keyed_failed_event_becomes_head_before_later_pending_ones(
    handled,
) -> None:
    first = publish("step", {"name": "first"}, key="org:1")
    fail(first)
    second = publish("step", {"name": "second"}, key="org:1")  # the head now
    third = publish("step", {"name": "third"}, key="org:1")
    assert ready_ids() == [second.pk]

    retry_events([first.pk], actor="ops")

    # Exactly one claimable head, the earliest unfinished event.
    assert ready_ids() == [first.pk]
    drain()
    assert handled == ["first", "second", "third"]
    assert third.pk > second.pk


@pytest.mark.sqlite
def test_retry_events__two_failed_events_of_a_key_rejoin_in_order(handled) -> None:
    first = publish("step", {"name": "first"}, key="org:1")
    second = publish("step", {"name": "second"}, key="org:1")
    fail(first)
    fail(second)

    result = retry_events([second.pk, first.pk], actor="ops")

    assert sorted(result.changed) == [first.pk, second.pk]
    assert ready_ids() == [first.pk]
    drain()
    assert handled == ["first", "second"]


@pytest.mark.sqlite
def test_retry_events__skips_a_keyed_event_while_a_later_one_is_processing(
    handled,
) -> None:
    first = publish("step", {"name": "first"}, key="org:1")
    fail(first)
    second = publish("step", {"name": "second"}, key="org:1")
    [claimed] = Worker(worker_id="w").claim()
    assert claimed.pk == second.pk

    result = retry_events([first.pk], actor="ops")

    assert result.changed == []
    assert result.skipped == {operations.KEY_BUSY: 1}
    assert OutboxEvent.objects.get(pk=first.pk).status == Status.FAILED


@pytest.mark.sqlite
def test_retry_events__works_through_selections_bigger_than_a_chunk(
    monkeypatch,
) -> None:
    monkeypatch.setattr(operations, "CHUNK", 2)
    OutboxEventFactory.create_batch(5, failed=True)

    result = retry_events(OutboxEvent.objects.all(), actor="ops")

    assert len(result.changed) == 5
    assert len(ready_ids()) == 5


@pytest.mark.django_db(transaction=True)
def test_retry_events__wakes_the_workers_once_on_commit() -> None:
    events = OutboxEventFactory.create_batch(3, failed=True)
    listener = listen()
    try:
        retry_events([event.pk for event in events], actor="ops")
        assert notifications(listener) == 1
    finally:
        listener.close()


@pytest.mark.django_db(transaction=True)
def test_retry_events__wakes_nobody_when_nothing_changed() -> None:
    event = OutboxEventFactory.create(completed=True)
    listener = listen()
    try:
        retry_events([event.pk], actor="ops")
        assert notifications(listener) == 0
    finally:
        listener.close()


@pytest.mark.sqlite
def test_discard_events__ends_pending_and_failed_events_recording_who_and_when() -> (
    None
):
    pending = OutboxEventFactory.create()
    failed = OutboxEventFactory.create(failed=True)

    result = discard_events(OutboxEvent.objects.all(), actor="ops@example.com")

    assert sorted(result.changed) == [pending.pk, failed.pk]
    for event in OutboxEvent.objects.all():
        assert event.status == Status.FAILED
        assert event.discarded_by == "ops@example.com"
        assert event.discarded_at is not None
        assert event.history[-1]["action"] == "discarded"
    assert drain().claimed == 0


@pytest.mark.sqlite
def test_discard_events__skips_completed_processing_and_discarded_events() -> None:
    OutboxEventFactory.create(completed=True)
    leased = OutboxEventFactory.create(leased=True)
    discarded = OutboxEventFactory.create(failed=True)
    discard_events([discarded.pk], actor="first")

    result = discard_events(OutboxEvent.objects.all(), actor="second")

    assert result.changed == []
    assert result.skipped == {
        operations.COMPLETED: 1,
        operations.LIVE_LEASE: 1,
        operations.DISCARDED: 1,
    }
    assert "1 completed" in result.describe_skipped()
    leased.refresh_from_db()
    assert (leased.status, leased.discarded_at) == (Status.PROCESSING, None)
    assert OutboxEvent.objects.get(pk=discarded.pk).discarded_by == "first"


@pytest.mark.sqlite
def test_discard_events__discarding_a_keys_head_lets_the_next_one_run(
    handled,
) -> None:
    head = publish("step", {"name": "head"}, key="org:1")
    after = publish("step", {"name": "next"}, key="org:1")
    publish("step", {"name": "last"}, key="org:1")

    discard_events([head.pk], actor="ops")

    # At once, not only after the workers' sweep for orphaned keys.
    assert ready_ids() == [after.pk]
    drain()
    assert handled == ["next", "last"]


@pytest.mark.sqlite
def test_discard_events__discarding_a_waiting_event_keeps_the_head(handled) -> None:
    head = publish("step", {"name": "head"}, key="org:1")
    middle = publish("step", {"name": "middle"}, key="org:1")
    publish("step", {"name": "last"}, key="org:1")

    discard_events([middle.pk], actor="ops")

    assert ready_ids() == [head.pk]
    drain()
    assert handled == ["head", "last"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("promoter", ["sweep", "recheck"])
def test_promotion__racing_an_operator_retry_leaves_one_head(monkeypatch, promoter):
    first = publish("step", {"name": "first"}, key="k")
    orphan = publish("step", {"name": "second"}, key="k")
    assert orphan.waiting
    # first failed for good; the second was left waiting with nothing ahead
    # (the worker that finished first died, or a publisher held the key when
    # it finished: the cases the sweep and the worker's recheck exist for).
    OutboxEvent.objects.filter(pk=first.pk).update(status=Status.FAILED, attempts=1)

    in_txn, go = threading.Event(), threading.Event()

    def paused_notify(using):
        in_txn.set()
        go.wait(5)

    monkeypatch.setattr("outbox.operations.notify_workers", paused_notify)

    def operator():
        retry_events([first.pk], actor="ops")

    def promote():
        if promoter == "sweep":
            ordering.promote_orphaned_heads("default")
        else:
            ordering.recheck({("k", "")}, "default")  # as the worker's maintenance does

    op = InThread(operator)
    assert in_txn.wait(5)  # operator: key + rows locked, first re-opened as head
    pr = InThread(promote)
    # The race happened: the promoter made its choice while the operator's
    # transaction was open. It skips the key it finds locked and finishes, or
    # (promoting from its snapshot) waits for the operator's row lock.
    try:
        finished_or_blocked(pr)
        assert op.thread.is_alive()
    finally:
        go.set()
    op.join()
    pr.join()

    heads = list(
        OutboxEvent.objects.filter(
            key="k", status__in=["pending", "processing"], waiting=False
        ).values_list("pk", flat=True)
    )
    assert heads == [first.pk]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "operation",
    [
        pytest.param(retry_events, id="retry"),
        pytest.param(discard_events, id="discard"),
    ],
)
def test_operations__wait_for_a_claim_in_flight_and_leave_what_it_claimed(
    operation,
) -> None:
    event = OutboxEventFactory.create(attempts=3)  # due now for its next attempt

    with open_transaction(claim_one):
        operator = InThread(lambda: operation([event.pk], actor="ops"))
        wait_until_blocked(operator)  # on the row the claim holds

    assert operator.join().skipped == {operations.LIVE_LEASE: 1}
    event.refresh_from_db()
    assert (event.status, event.locked_by, event.discarded_at) == (
        Status.PROCESSING,
        "w",
        None,
    )


@pytest.mark.django_db(transaction=True)
def test_retry_events__waits_for_a_claim_of_a_later_event_of_the_key() -> None:
    first = publish("step", {"name": "first"}, key="org:1")
    fail(first)
    publish("step", {"name": "second"}, key="org:1")  # the head, claimed below

    with open_transaction(claim_one):
        operator = InThread(lambda: retry_events([first.pk], actor="ops"))
        wait_until_blocked(operator)  # on the key's events the claim holds

    # Seen as the claim committed it: the second is processing, so the first
    # cannot become the head again before it.
    assert operator.join().skipped == {operations.KEY_BUSY: 1}
    assert OutboxEvent.objects.get(pk=first.pk).status == Status.FAILED


@pytest.mark.django_db(transaction=True)
def test_retry_events__waits_for_a_publisher_then_holds_its_event_back() -> None:
    first = publish("step", {"name": "first"}, key="org:1")
    fail(first)

    with open_transaction(lambda: publish("step", {"name": "late"}, key="org:1")):
        operator = InThread(lambda: retry_events([first.pk], actor="ops"))
        wait_until_blocked(operator)  # on the key's lock the publisher holds

    assert operator.join().changed == [first.pk]
    assert ready_ids() == [first.pk]  # the late event waits behind it


@pytest.mark.django_db(transaction=True)
def test_discard_events__waits_for_a_publisher_then_promotes_its_event() -> None:
    head = publish("step", {"name": "head"}, key="org:1")

    with open_transaction(
        lambda: publish("step", {"name": "late"}, key="org:1")
    ) as late:
        operator = InThread(lambda: discard_events([head.pk], actor="ops"))
        wait_until_blocked(operator)  # on the key's lock the publisher holds

    assert operator.join().changed == [head.pk]
    assert ready_ids() == [late.pk]


@pytest.mark.django_db(transaction=True)
def test_discard_events__wakes_the_workers_when_the_keys_next_event_is_ready() -> None:
    head = publish("step", {"name": "head"}, key="org:1")
    publish("step", {"name": "next"}, key="org:1")
    listener = listen()
    try:
        discard_events([head.pk], actor="ops")
        assert notifications(listener) == 1
    finally:
        listener.close()
