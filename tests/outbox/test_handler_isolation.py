"""A handler's failure stays its own: writes, callbacks and the transaction."""

import pytest
from django.db import IntegrityError, connection, transaction

from outbox import NewEvent, publish, publish_many, publishing
from outbox.errors import UnsupportedIsolationLevel
from outbox.models import OutboxEvent
from outbox.worker import Worker
from tests.outbox.sessions import InThread, backend_pid, waiting_for_a_lock
from tests.outbox.worker_process import wait_until
from tests.outbox_app.models import SideEffect

#: PGPROC_MAX_CACHED_SUBXIDS: past this many open subtransactions in one
#: transaction, PostgreSQL's visibility checks slow down for every session.
POSTGRESQL_CACHED_SUBTRANSACTIONS = 64


def record(event: OutboxEvent) -> None:
    SideEffect.objects.create(event_uuid=event.uuid)


@pytest.mark.django_db(transaction=True)
def test_failed_handler__its_on_commit_callbacks_never_run(register_handler):
    sent: list[str] = []

    def schedule_then_fail(event: OutboxEvent) -> None:
        transaction.on_commit(lambda: sent.append("ghost email"))
        publish("follow.up", {})
        raise ConnectionError("then the handler fails")

    def schedule(event: OutboxEvent) -> None:
        transaction.on_commit(lambda: sent.append("real email"))

    register_handler("flaky", schedule_then_fail)
    register_handler("fine", schedule)
    publish("flaky", {})
    publish("fine", {})

    result = Worker().run_once()

    assert (result.completed, result.retried) == (1, 1)
    assert sent == ["real email"]
    assert not OutboxEvent.objects.filter(event_type="follow.up").exists()


@pytest.mark.sqlite
@pytest.mark.django_db
def test_handler_that_swallows_an_error_inside_atomic__fails_alone(register_handler):
    def swallow(event: OutboxEvent) -> None:
        SideEffect.objects.create(event_uuid=event.uuid)
        try:
            with transaction.atomic(savepoint=False):
                SideEffect.objects.create(event_uuid=event.uuid)  # duplicate
        except IntegrityError:
            pass  # and carries on as if nothing happened

    register_handler("swallow", swallow)
    register_handler("fine", record)
    bad = publish("swallow", {})
    good = publish("fine", {})

    result = Worker().run_once()

    assert (result.completed, result.retried) == (1, 1)
    bad.refresh_from_db()
    assert "TransactionManagementError" in bad.last_error
    assert list(SideEffect.objects.values_list("event_uuid", flat=True)) == [good.uuid]


@pytest.mark.sqlite
@pytest.mark.django_db
def test_key__an_event_published_behind_a_retried_head_still_waits(
    register_handler, fast_outbox
):
    """A handler publishes an event of a key whose head is in the same batch.

    The head was marked completed with the batch, so the new event saw no
    earlier unfinished event of its key; the head then fails and is retried:
    the new event must wait behind it, not run first.
    """
    seen: list[str] = []

    def head(event: OutboxEvent) -> None:
        seen.append("head")
        if seen.count("head") == 1:
            raise ConnectionError("first try fails")

    register_handler("publisher", lambda event: publish("follower", {}, key="org:1"))
    register_handler("head", head)
    register_handler("follower", lambda event: seen.append("follower"))
    publish("publisher", {})
    publish("head", {}, key="org:1")

    first = Worker().run_once()

    assert (first.completed, first.retried) == (1, 1)
    follower = OutboxEvent.objects.get(event_type="follower")
    assert follower.waiting
    for _ in range(100):
        if not Worker().run_once().claimed and len(seen) == 3:
            break
    assert seen == ["head", "head", "follower"]


@pytest.mark.sqlite
@pytest.mark.django_db
def test_key__head_released_after_a_sibling_published_behind_it(register_handler):
    """A handler publishes an event of a key whose head is in the same batch.

    The head is marked completed first, so the new event does not wait; the
    head is then released (the worker is stopping): the new event must not
    run before it.
    """
    worker = Worker()

    def publish_behind_and_stop(event: OutboxEvent) -> None:
        publish("step", {"name": "behind"}, key="org:1")
        worker.stop_requested.set()

    seen: list[str] = []
    register_handler("publisher", publish_behind_and_stop)
    register_handler("step", lambda event: seen.append(event.payload["name"]))
    publish("publisher", {})
    head = publish("step", {"name": "head"}, key="org:1")

    result = worker.run_once()

    assert (result.completed, result.released) == (1, 1)
    assert list(OutboxEvent.objects.ready()) == [head]
    Worker().run_once()
    Worker().run_once()
    assert seen == ["head", "behind"]


@pytest.mark.django_db(transaction=True)
def test_publish_many__losing_an_idempotency_race_returns_the_winner():
    """The loser waits on the winner's uncommitted row, then gets its event."""
    backend: list[int] = []

    @transaction.atomic
    def lose() -> list[OutboxEvent]:
        backend.append(backend_pid())
        return publish_many(
            [NewEvent("x", {"n": 1}, idempotency_key="race"), NewEvent("y", {})]
        )

    with transaction.atomic():
        winner = publish("x", {"n": 0}, idempotency_key="race")
        loser = InThread(lose)
        wait_until(lambda: bool(backend) and waiting_for_a_lock(backend[0]), timeout=5)
    results = loser.join()

    assert [event.pk for event in results[:1]] == [winner.pk]
    assert results[1].pk is not None
    assert OutboxEvent.objects.count() == 2


@pytest.mark.django_db(transaction=True)
def test_publish_many__a_lost_race_at_a_lanes_head_leaves_the_lane_a_head():
    """The batch's first event of key k loses its idempotency key to another
    publisher, so it is never inserted: k's next event, in the next chunk,
    must be k's head, not wait behind an event that does not exist."""
    backend: list[int] = []
    chunk = publishing.INSERT_CHUNK

    @transaction.atomic
    def lose() -> list[OutboxEvent]:
        backend.append(backend_pid())
        return publish_many(
            [NewEvent("x", {"n": n}) for n in range(chunk - 1)]
            + [NewEvent("x", {"n": chunk - 1}, key="k", idempotency_key="race")]
            + [NewEvent("x", {"n": chunk}, key="k")]
        )

    with transaction.atomic():
        winner = publish("x", {"n": "winner"}, idempotency_key="race")
        loser = InThread(lose)
        wait_until(lambda: bool(backend) and waiting_for_a_lock(backend[0]), timeout=5)
    results = loser.join()

    assert results[chunk - 1].pk == winner.pk
    assert list(
        OutboxEvent.objects.filter(key="k").values_list("payload__n", "waiting")
    ) == [(chunk, False)]


@pytest.mark.django_db(transaction=True)
def test_keyed_publish__refuses_repeatable_read():
    with pytest.raises(UnsupportedIsolationLevel), transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        publish("x", {}, key="org:1")

    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        publish("x", {})  # without a key, any isolation level will do
