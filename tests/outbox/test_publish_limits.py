"""publish() refuses what the database cannot store, at the call.

On PostgreSQL each of these values fails inside the INSERT and aborts the
caller's transaction; SQLite stores them silently. Refused before any query,
the caller's transaction goes on, on both.
"""

import pytest
from django.db import connection, transaction
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from outbox import NewEvent, publish, publish_many
from outbox.models import OutboxEvent

pytestmark = pytest.mark.sqlite

TOO_LONG = r"is 201 characters long; the limit is 200\."
NUL = r"contains a NUL character \(U\+0000\)"

REFUSED = [
    pytest.param({"event_type": "t" * 201}, ValueError, TOO_LONG, id="long-type"),
    pytest.param({"key": "k" * 201}, ValueError, TOO_LONG, id="long-key"),
    pytest.param(
        {"idempotency_key": "i" * 201}, ValueError, TOO_LONG, id="long-idempotency"
    ),
    pytest.param({"event_type": "a\x00b"}, ValueError, NUL, id="nul-type"),
    pytest.param({"key": "org:\x00"}, ValueError, NUL, id="nul-key"),
    pytest.param({"idempotency_key": "\x00"}, ValueError, NUL, id="nul-idempotency"),
    pytest.param(
        {"key": "org:\ud800"}, ValueError, r"lone surrogate \(U\+D800\)", id="sur-key"
    ),
    pytest.param({"event_type": 7}, TypeError, "must be a string, not int", id="int"),
    pytest.param({"key": 7}, TypeError, r"publish\(key=\.\.\.\) must be a str", id="k"),
    pytest.param(
        {"idempotency_key": b"x"}, TypeError, "must be a string, not bytes", id="b"
    ),
    pytest.param(
        {"max_attempts": 2**31},
        ValueError,
        r"max_attempts=\.\.\.\) is 2147483648; the limit is 2147483647",
        id="huge-max-attempts",
    ),
    pytest.param(
        {"max_attempts": "3"}, TypeError, "must be an integer", id="str-max-attempts"
    ),
    pytest.param(
        {"payload": {"ratio": float("nan")}}, ValueError, "NaN or Infinity", id="nan"
    ),
    pytest.param(
        {"payload": {"deep": [1, {"x": [float("-inf")]}]}},
        ValueError,
        r"publish\(payload=\.\.\.\) contains NaN or Infinity",
        id="nested-infinity",
    ),
    pytest.param({"payload": {"note": "a\x00b"}}, ValueError, NUL, id="nul-value"),
    pytest.param({"payload": {"a\x00": 1}}, ValueError, NUL, id="nul-dict-key"),
    pytest.param(
        {"payload": ["ok", {"n": ["\udc00"]}]},
        ValueError,
        r"payload=\.\.\.\) contains a lone surrogate \(U\+DC00\)",
        id="lone-low-surrogate",
    ),
    pytest.param(
        {"payload": {"\ud83dx": 1}},
        ValueError,
        r"lone surrogate \(U\+D83D\)",
        id="lone-high-surrogate-in-a-key",
    ),
]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("arguments", "error", "message"), REFUSED)
def test_publish__refuses_at_the_call_and_the_transaction_goes_on(
    arguments, error, message
) -> None:
    call = {"event_type": "refused", "payload": {}, **arguments}
    with transaction.atomic():
        publish("before", {})
        with (
            CaptureQueriesContext(connection) as queries,
            pytest.raises(error, match=message),
        ):
            publish(**call)
        assert queries.captured_queries == []  # refused before any query
        assert OutboxEvent.objects.count() == 1  # the transaction still works
        publish("after", {}, key="org:1")

    assert sorted(OutboxEvent.objects.values_list("event_type", flat=True)) == [
        "after",
        "before",
    ]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("arguments", "error", "message"), REFUSED[:4])
def test_publish_many__refuses_the_batch_at_the_call_and_the_transaction_goes_on(
    arguments, error, message
) -> None:
    bad = NewEvent(**{"event_type": "refused", "payload": {}, **arguments})
    with transaction.atomic():
        with (
            CaptureQueriesContext(connection) as queries,
            pytest.raises(error, match=message),
        ):
            publish_many([NewEvent("good", {}), bad])
        assert queries.captured_queries == []
        publish_many([NewEvent("after", {})])

    assert list(OutboxEvent.objects.values_list("event_type", flat=True)) == ["after"]


@pytest.mark.django_db
def test_publish__stores_what_only_looks_unstorable() -> None:
    payload = {
        "emoji": "😀",  # a surrogate pair in the JSON text: fine
        "hangul": "한국어",  # \ud55c...: a \ud escape that is no surrogate
        "escaped": "\\u0000 and \\ud800",  # backslashes, not a NUL or surrogate
        "k😀": [1.5, -0.0, 10**30],
    }

    event = publish("t" * 200, payload, key="k" * 200, idempotency_key="i" * 200)

    event.refresh_from_db()
    assert event.payload == payload
    assert (len(event.event_type), len(event.key)) == (200, 200)


@pytest.mark.django_db
def test_publish__refuses_a_payload_over_the_size_setting() -> None:
    # {"s": "..."} is 9 bytes of JSON around the string.
    with override_settings(OUTBOX={"MAX_PAYLOAD_BYTES": "64"}):
        publish("fits", {"s": "x" * 55})
        with pytest.raises(
            ValueError,
            match=r"publish\(payload=\.\.\.\) is 65 bytes as JSON; the limit is 64 "
            r"\(settings\.OUTBOX\['MAX_PAYLOAD_BYTES'\], environment variable "
            r"OUTBOX_MAX_PAYLOAD_BYTES\)\.",
        ):
            publish("too.big", {"s": "x" * 56})
        # Non-ASCII is sent escaped, and counted as sent: é is \u00e9.
        with pytest.raises(ValueError, match="is 69 bytes"):
            publish("too.big", {"s": "é" * 10})

    assert list(OutboxEvent.objects.values_list("event_type", flat=True)) == ["fits"]


@pytest.mark.django_db
def test_publish__payload_limit_defaults_to_a_mebibyte() -> None:
    with override_settings(OUTBOX={}):
        publish("fits", {"s": "x" * (1_048_576 - 9)})
        with pytest.raises(ValueError, match="the limit is 1,048,576"):
            publish("too.big", {"s": "x" * (1_048_576 - 8)})
