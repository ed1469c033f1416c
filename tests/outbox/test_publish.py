from datetime import UTC, datetime
from decimal import Decimal

import django
import pytest
from django.db import transaction

from outbox import publish
from outbox.models import OutboxEvent, Status
from tests.outbox.listening import listen, notifications
from tests.outbox.sessions import InThread, backend_pid, waiting_for_a_lock
from tests.outbox.worker_process import wait_until


class ForcedRollbackError(Exception):
    pass


@pytest.mark.sqlite
@pytest.mark.django_db(transaction=True)
def test_publish__commits_with_the_callers_transaction() -> None:
    with transaction.atomic():
        event = publish("user.invited", {"invitation_id": 7})

    stored = OutboxEvent.objects.get()
    assert stored.pk == event.pk
    assert stored.status == Status.PENDING
    assert stored.payload == {"invitation_id": 7}
    assert stored.attempts == 0
    assert stored.max_attempts == 10
    assert stored.available_at is not None and stored.created_at is not None


@pytest.mark.sqlite
@pytest.mark.django_db(transaction=True)
def test_publish__rolls_back_with_the_callers_transaction() -> None:
    with pytest.raises(ForcedRollbackError), transaction.atomic():
        publish("user.invited", {"invitation_id": 7})
        raise ForcedRollbackError

    assert not OutboxEvent.objects.exists()


@pytest.mark.sqlite
@pytest.mark.django_db
def test_publish__unserialisable_payload_raises_type_error_at_the_call() -> None:
    with transaction.atomic():
        with pytest.raises(TypeError):
            publish("thing.happened", {"handle": object()})
        publish("thing.happened", {"handle": "ok"})  # the transaction goes on

    assert list(OutboxEvent.objects.values_list("payload", flat=True)) == [
        {"handle": "ok"}
    ]


@pytest.mark.sqlite
@pytest.mark.django_db
def test_publish__encodes_with_djangos_json_encoder() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

    event = publish("thing.happened", {"at": when, "amount": Decimal("1.50")})

    event.refresh_from_db()
    assert event.payload == {"at": "2026-01-02T03:04:05Z", "amount": "1.50"}


@pytest.mark.sqlite
@pytest.mark.django_db
def test_publish__same_idempotency_key_returns_the_first_event() -> None:
    first = publish("user.invited", {"n": 1}, idempotency_key="invite:1")
    second = publish("user.invited", {"n": 2}, idempotency_key="invite:1")

    assert second.pk == first.pk
    assert second.payload == {"n": 1}
    assert OutboxEvent.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_publish__concurrent_idempotency_keys_write_one_event() -> None:
    """The loser waits on the winner's uncommitted row, then gets its event.

    The loser's transaction stays usable: it lost the race in a savepoint.
    """
    backend: list[int] = []
    results: dict[str, int] = {}

    @transaction.atomic
    def lose() -> None:
        backend.append(backend_pid())
        results["loser"] = publish("x", {}, idempotency_key="race").pk
        results["after"] = publish("y", {}).pk

    with transaction.atomic():
        results["winner"] = publish("x", {}, idempotency_key="race").pk
        loser = InThread(lose)
        wait_until(lambda: bool(backend) and waiting_for_a_lock(backend[0]))
    loser.join()

    assert results["loser"] == results["winner"]
    assert "after" in results
    assert OutboxEvent.objects.filter(event_type="x").count() == 1
    assert OutboxEvent.objects.filter(event_type="y").count() == 1


@pytest.mark.sqlite
@pytest.mark.django_db
def test_publish__available_at_and_max_attempts_are_kept() -> None:
    later = datetime(2030, 1, 1, tzinfo=UTC)

    event = publish("x", {}, available_at=later, max_attempts=3)

    event.refresh_from_db()
    assert event.available_at == later
    assert event.max_attempts == 3
    assert not OutboxEvent.objects.ready().exists()


@pytest.mark.sqlite
@pytest.mark.django_db
def test_publish__handler_max_attempts_is_the_default(register_handler) -> None:
    register_handler("limited", lambda event: None, max_attempts=2)

    assert publish("limited", {}).max_attempts == 2
    assert publish("limited", {}, max_attempts=5).max_attempts == 5


@pytest.mark.sqlite
@pytest.mark.django_db
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"event_type": ""}, "non-empty event type"),
        ({"event_type": "x", "max_attempts": 0}, "at least 1"),
    ],
)
def test_publish__rejects_bad_arguments(arguments, message) -> None:
    with pytest.raises(ValueError, match=message):
        publish(payload={}, **arguments)


@pytest.mark.sqlite
@pytest.mark.django_db
def test_publish__keyed_events_wait_behind_the_keys_first() -> None:
    first = publish("x", {}, key="org:1")
    second = publish("x", {}, key="org:1")
    other = publish("x", {}, key="org:2")
    unkeyed = publish("x", {})

    assert (first.waiting, second.waiting, other.waiting, unkeyed.waiting) == (
        False,
        True,
        False,
        False,
    )
    assert list(OutboxEvent.objects.ready()) == [first, other, unkeyed]


@pytest.mark.django_db(transaction=True)
def test_publish__notifies_once_per_committed_transaction() -> None:
    listener = listen()
    try:
        with transaction.atomic():
            for number in range(5):
                publish("x", {"n": number})
        assert notifications(listener) == 1
        publish("x", {})  # autocommit: its own transaction
        assert notifications(listener) == 1
    finally:
        listener.close()


@pytest.mark.django_db(transaction=True)
def test_publish__never_notifies_for_a_rolled_back_transaction() -> None:
    listener = listen()
    try:
        with pytest.raises(ForcedRollbackError), transaction.atomic():
            publish("x", {})
            raise ForcedRollbackError
        assert notifications(listener) == 0
    finally:
        listener.close()


@pytest.mark.django_db(transaction=True)
def test_publish__rolled_back_savepoint_takes_its_wakeup_along() -> None:
    """Nothing else in the transaction notifies, so a leaked wake-up would show.

    (PostgreSQL merges identical notifications of one transaction: had the
    transaction published again, one notification would arrive either way.)
    """
    listener = listen()
    try:
        with transaction.atomic():
            with pytest.raises(ForcedRollbackError), transaction.atomic():
                publish("x", {})
                raise ForcedRollbackError
            OutboxEvent.objects.count()  # the transaction goes on, and commits
        assert notifications(listener) == 0
        assert not OutboxEvent.objects.exists()
    finally:
        listener.close()


@pytest.mark.django_db
def test_publish__a_keyed_event_costs_a_lock_and_an_insert(
    django_assert_max_num_queries,
):
    publish("x", {}, key="k")
    # Django before 6.0 needs one more query to read back the waiting flag.
    with django_assert_max_num_queries(2 if django.VERSION >= (6, 0) else 3):
        publish("x", {}, key="k")

    assert OutboxEvent.objects.ready().count() == 1
