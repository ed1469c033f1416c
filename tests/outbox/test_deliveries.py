"""The rows publish() and publish_many() write (outbox/deliveries.py).

On PostgreSQL the INSERT is written by hand and the events it returns are
built without a query, so these tests hold both to what the database stored:
every field, for a few rows (a VALUES list) and for many (one JSON document),
with text that JSON must escape and times to the microsecond.
"""

from datetime import datetime, timedelta
from datetime import timezone as dt_timezone

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from outbox import NewEvent, publish, publish_many, publishing
from outbox.deliveries import LISTED_ROWS
from outbox.models import OutboxEvent, Status

pytestmark = [pytest.mark.sqlite, pytest.mark.django_db]

#: Text that JSON must escape, or that a hand-written encoder might mangle.
AWKWARD = [
    'a "quoted" word',
    "back\\slash \\u0041 not an escape",
    "tab\tnew\nline\r",
    "\x01\x1f controls",
    "é ß 中文 🎉 \u2028\u2029",
    "</script>'; DROP TABLE outbox_outboxevent; --",
]


def concrete_values(event: OutboxEvent) -> dict[str, object]:
    return {
        field.attname: getattr(event, field.attname)
        for field in OutboxEvent._meta.concrete_fields
    }


def assert_as_stored(events: list[OutboxEvent]) -> None:
    """Each event is what the database holds for it, field by field."""
    stored = OutboxEvent.objects.in_bulk([event.pk for event in events])
    assert len(stored) == len(events)
    for event in events:
        assert concrete_values(event) == concrete_values(stored[event.pk])
        assert event._state.adding is False
        assert event._state.db == "default"


@pytest.fixture
def subscribed(register_handler) -> None:
    register_handler("rows.fanned", lambda event: None)
    register_handler("rows.fanned", lambda event: None, name="crm-sync")


@pytest.mark.parametrize(
    "arguments",
    [
        {},
        {"key": "org:1"},
        {"idempotency_key": "rows:1", "max_attempts": 3, "queue": "mail"},
        {"available_at": "later"},
    ],
    ids=["plain", "keyed", "idempotent", "deferred"],
)
def test_publish__returns_the_row_as_stored(arguments, subscribed) -> None:
    if arguments.get("available_at") == "later":
        arguments["available_at"] = timezone.now() + timedelta(seconds=1.234567)
    with transaction.atomic():
        events = [
            publish("rows.plain", {"n": 1}, **arguments),
            publish("rows.fanned", {"n": 2, "nested": [1.5, None, True]}),
        ]

    assert_as_stored(events)
    assert events[0].status == Status.PENDING
    assert events[0].history == [] and events[0].history is not events[1].history
    if "available_at" in arguments:
        assert events[0].available_at == arguments["available_at"]
    else:
        assert events[0].available_at == events[0].created_at


def test_publish__a_key_waits_behind_its_unfinished_event_as_stored() -> None:
    head = publish("rows.keyed", {"n": 1}, key="org:1")
    follower = publish("rows.keyed", {"n": 2}, key="org:1")
    assert_as_stored([head, follower])
    OutboxEvent.objects.filter(pk=head.pk).update(status=Status.COMPLETED)
    third = publish("rows.keyed", {"n": 3}, key="org:1")
    OutboxEvent.objects.filter(pk=follower.pk).update(status=Status.FAILED)
    fourth = publish("rows.keyed", {"n": 4}, key="org:1")

    # The third waits for the follower, still unfinished; the fourth for the third.
    assert [event.waiting for event in (head, follower, third, fourth)] == [
        False,
        True,
        True,
        True,
    ]
    assert_as_stored([third, fourth])


@pytest.mark.parametrize("count", [LISTED_ROWS, LISTED_ROWS + 1, 2_500])
def test_publish_many__returns_each_row_as_stored_in_order(count) -> None:
    later = timezone.now() + timedelta(minutes=1, microseconds=7)
    events = publish_many(
        NewEvent(
            "rows.many",
            {"n": n, "text": AWKWARD[n % len(AWKWARD)]},
            key=f"key-{n % 3}" if n % 2 else None,
            available_at=later if n % 5 == 0 else None,
        )
        for n in range(count)
    )

    assert [event.payload["n"] for event in events] == list(range(count))
    assert [event.pk for event in events] == sorted(event.pk for event in events)
    assert_as_stored(events)
    assert events[0].available_at == later


def test_publish_many__stores_awkward_text_exactly() -> None:
    """The document path escapes every text field as JSON must."""
    events = publish_many(
        NewEvent(
            f"rows.{text}",
            {text: [text], "n": n},
            key=text,
            idempotency_key=f"{n}:{text}",
        )
        for n, text in enumerate(AWKWARD * 2)
    )

    assert len(events) > LISTED_ROWS
    stored = OutboxEvent.objects.order_by("id")
    assert [(e.event_type, e.key, e.idempotency_key, e.payload) for e in stored] == [
        (f"rows.{text}", text, f"{n}:{text}", {text: [text], "n": n})
        for n, text in enumerate(AWKWARD * 2)
    ]


def test_publish_many__orders_lanes_across_the_table_and_the_batch(subscribed):
    earlier = publish("rows.fanned", {"n": -1}, key="a")
    events = publish_many(
        NewEvent("rows.fanned", {"n": n}, key=("a", "b", "")[n % 3] or None)
        for n in range(3 * LISTED_ROWS)
    )

    rows = OutboxEvent.objects.exclude(uuid=earlier.uuid).order_by("id")
    # Key "a" waits behind the earlier event, in each subscriber's lane; key
    # "b" has one head per lane, the first published; no key never waits.
    heads = [
        (row.payload["n"], row.subscriber)
        for row in rows
        if not row.waiting and row.key
    ]
    assert heads == [(1, ""), (1, "crm-sync")]
    assert not any(row.waiting for row in rows if not row.key)
    assert [row.payload["n"] for row in rows[::2]] == list(range(3 * LISTED_ROWS))
    assert_as_stored(events)


def test_publish__refuses_a_payload_of_none_and_the_transaction_goes_on() -> None:
    with transaction.atomic():
        with pytest.raises(ValueError, match=r"publish\(payload=...\) is None"):
            publish("rows.empty", None)
        publish("rows.empty", {})

    assert OutboxEvent.objects.get().payload == {}


@pytest.mark.parametrize(
    "offset",
    [timedelta(hours=-16), timedelta(hours=15, minutes=59, seconds=59, microseconds=1)],
    ids=["beyond-15:59", "fraction-of-a-second"],
)
@pytest.mark.parametrize("count", [1, LISTED_ROWS + 1])
def test_publish__takes_any_offset_python_allows(offset, count) -> None:
    """PostgreSQL refuses some of them: the event is written in UTC."""
    when = datetime(2030, 1, 1, tzinfo=dt_timezone(offset))
    with transaction.atomic():
        events = publish_many(
            NewEvent("rows.later", {}, available_at=when) for _ in range(count)
        )
        publish("rows.later", {}, available_at=when)

    assert {event.available_at for event in OutboxEvent.objects.all()} == {when}
    assert_as_stored(events)


def test_publish_many__splits_a_batch_by_its_payloads_size(monkeypatch) -> None:
    """A statement's rows are one jsonb document, which PostgreSQL caps."""
    monkeypatch.setattr(publishing, "INSERT_BYTES", 10_000)
    with CaptureQueriesContext(connection) as queries:
        events = publish_many(
            NewEvent("rows.big", {"n": n, "text": "x" * 3_000}) for n in range(10)
        )

    inserts = [
        q["sql"] for q in queries.captured_queries if q["sql"].startswith("INSERT")
    ]
    # Three events of about 3 KB a statement; the last one alone.
    assert [sql.count("rows.big") for sql in inserts] == [3, 3, 3, 1]
    assert [event.payload["n"] for event in events] == list(range(10))
    assert_as_stored(events)
