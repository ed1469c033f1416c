import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from outbox import NewEvent, publish, publish_many
from outbox.models import OutboxEvent

pytestmark = [pytest.mark.django_db, pytest.mark.sqlite]


def test_publish_many__writes_every_event_in_order() -> None:
    events = publish_many(NewEvent("x", {"n": n}) for n in range(2500))

    assert [event.payload["n"] for event in events] == list(range(2500))
    assert all(event.pk for event in events)
    assert OutboxEvent.objects.count() == 2500


def test_publish_many__inserts_a_thousand_rows_per_statement() -> None:
    with CaptureQueriesContext(connection) as queries:
        publish_many(NewEvent("chunked.row", {}) for _ in range(2500))

    statements = [query["sql"] for query in queries.captured_queries]
    inserts = [sql for sql in statements if sql.startswith("INSERT")]
    assert len(inserts) == len(statements) == 3  # no lookups either
    # Rows per INSERT, each naming its event type once: 1,000, 1,000, 500.
    assert [sql.count("chunked.row") for sql in inserts] == [1000, 1000, 500]


def test_publish_many__validates_everything_before_writing() -> None:
    with pytest.raises(TypeError):
        publish_many([NewEvent("x", {}), NewEvent("x", {"bad": object()})])

    assert not OutboxEvent.objects.exists()


def test_publish_many__idempotency_keys_return_the_first_event() -> None:
    old = publish("x", {"n": 0}, idempotency_key="a")

    events = publish_many(
        [
            NewEvent("x", {"n": 1}, idempotency_key="a"),
            NewEvent("x", {"n": 2}, idempotency_key="b"),
            NewEvent("x", {"n": 3}, idempotency_key="b"),
            NewEvent("x", {"n": 4}),
        ]
    )

    assert events[0].pk == old.pk
    assert events[1].pk == events[2].pk
    assert [event.payload["n"] for event in events] == [0, 2, 2, 4]
    assert OutboxEvent.objects.count() == 3


def test_publish_many__keyed_events_wait_behind_earlier_ones() -> None:
    publish("x", {}, key="busy")

    events = publish_many(
        [NewEvent("x", {}, key="busy"), NewEvent("x", {}, key="new")] * 2
    )

    assert [event.waiting for event in events] == [True, False, True, True]


def test_publish_many__rolls_back_with_the_callers_transaction() -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        publish_many([NewEvent("x", {})])
        raise RuntimeError

    assert not OutboxEvent.objects.exists()
