"""Dead letters grouped by cause, and the keys held back: outbox/causes.py,
monitoring.failure_groups() and held_keys(), and their admin page."""

import importlib
import re

import pytest
from django.apps import apps
from django.contrib.admin.models import LogEntry
from django.db import connection
from django.urls import reverse

from outbox import NewEvent, monitoring, operations, publish, publish_many
from outbox.causes import CAUSE_LIMIT, cause_of
from outbox.models import OutboxEvent, Status
from outbox.operations import discard_events, retry_events
from outbox.testing import drain
from tests.outbox.factories import OutboxEventFactory

pytestmark = pytest.mark.django_db

DEAD_LETTERS = "admin:outbox_outboxevent_dead_letters"
RETRY_FAILED = "admin:outbox_outboxevent_retry_failed"
DISCARD_FAILED = "admin:outbox_outboxevent_discard_failed"


@pytest.mark.parametrize(
    ("last_error", "cause"),
    [
        (
            "smtplib.SMTPServerDisconnected: closed after 30.5 s",
            "smtplib.SMTPServerDisconnected: closed after <n> s",
        ),
        (
            "ValueError: order 12345 of 'bob' not found (id=9f86d081884c7d65)",
            "ValueError: order <n> of '…' not found (id=<id>)",
        ),
        (
            "RuntimeError: job 6f1c2a9e-8b1d-4c3e-9a2b-1c2d3e4f5a6b ran on host42",
            "RuntimeError: job <id> ran on host<n>",
        ),
        (
            'IntegrityError: violates "users_email_key"\nDETAIL:  Key (email)=(…)',
            'IntegrityError: violates "…"',
        ),
        ("ConnectionError", "ConnectionError"),
        ("KeyError: 'x'", "KeyError: '…'"),
    ],
)
def test_cause__strips_numbers_ids_and_quoted_values(last_error, cause) -> None:
    assert cause_of(last_error) == cause


def test_cause__fits_its_column() -> None:
    cause = cause_of("ValueError: " + "word " * 200)

    assert len(cause) == CAUSE_LIMIT
    assert cause.endswith("…")


def fail_with(register_handler, causes: dict[int, str]) -> None:
    """Register a handler that raises causes[n % len(causes)] for payload n."""

    def handle(event: OutboxEvent) -> None:
        n = event.payload["n"]
        kind = causes[n % len(causes)]
        if kind == "timeout":
            raise TimeoutError(f"gateway timed out after {n}.{n % 7} s")
        if kind == "missing":
            raise LookupError(f"order {n} of 'customer-{n}' not found")
        raise ConnectionRefusedError(f"[Errno 111] refused by 10.0.0.{n % 250}")

    register_handler("order.sync", handle, max_attempts=1)


def test_dead_letters__a_thousand_failures_of_three_causes_are_three_groups(
    register_handler, operator
) -> None:
    fail_with(register_handler, {0: "timeout", 1: "missing", 2: "refused"})
    for n in range(1000):
        publish("order.sync", {"n": n})

    result = drain(batch_size=100)

    assert result.failed == 1000
    groups = monitoring.failure_groups()
    assert [(group.error_class, group.message, group.count) for group in groups] == [
        ("TimeoutError", "gateway timed out after <n> s", 334),
        ("ConnectionRefusedError", "[Errno <n>] refused by <n>", 333),
        ("LookupError", "order <n> of '…' not found", 333),
    ]
    assert {group.event_type for group in groups} == {"order.sync"}
    assert all(
        group.first_failed_at <= group.last_failed_at  # type: ignore[operator]
        for group in groups
    )
    page = operator.get(reverse(DEAD_LETTERS))
    assert page.status_code == 200
    html = page.content.decode()
    assert html.count('class="outbox-failure-group"') == 3
    assert re.findall(r'data-count="group">(\d+)<', html) == ["334", "333", "333"]


def test_dead_letters__retrying_one_group_retries_exactly_its_events(
    register_handler, operator
) -> None:
    fail_with(register_handler, {0: "timeout", 1: "missing", 2: "refused"})
    for n in range(90):
        publish("order.sync", {"n": n})
    drain()
    # Three groups of 30: the first shown is ConnectionRefusedError's.
    group = monitoring.failure_groups()[0]
    refused = set(
        OutboxEvent.objects.filter(error_cause=group.cause).values_list("pk", flat=True)
    )
    assert group.error_class == "ConnectionRefusedError"
    html = operator.get(reverse(DEAD_LETTERS)).content.decode()
    retry = re.search(r'href="([^"]*)" class="outbox-group-retry"', html)
    assert retry is not None
    url = retry[1].replace("&amp;", "&")
    assert url.startswith(reverse(RETRY_FAILED))

    page = operator.get(url)
    assert page.context["count"] == group.count == 30
    response = operator.post(url, {"confirmed_count": "30"})

    assert response.status_code == 302
    pending = set(
        OutboxEvent.objects.filter(status=Status.PENDING).values_list("pk", flat=True)
    )
    assert pending == refused
    assert OutboxEvent.objects.filter(status=Status.FAILED).count() == 60
    assert set(LogEntry.objects.values_list("object_id", flat=True)) == {
        str(pk) for pk in refused
    }
    assert [group.count for group in monitoring.failure_groups()] == [30, 30]


def test_dead_letters__discarding_one_group_discards_exactly_its_events(
    register_handler, operator
) -> None:
    fail_with(register_handler, {0: "timeout", 1: "missing"})
    for n in range(20):
        publish("order.sync", {"n": n})
    drain()
    missing = monitoring.failure_groups()[0]  # 10 each: in order of cause
    assert missing.error_class == "LookupError"
    html = operator.get(reverse(DEAD_LETTERS)).content.decode()
    links = re.findall(r'href="([^"]*)" class="outbox-group-discard"', html)
    url = links[0].replace("&amp;", "&")

    page = operator.get(url)
    assert page.context["count"] == 10
    assert 'value="Yes, discard 10 events"' in page.content.decode()
    operator.post(url, {"confirmed_count": "10"})

    discarded = OutboxEvent.objects.filter(discarded_at__isnull=False)
    assert set(discarded.values_list("error_cause", flat=True)) == {missing.cause}
    assert discarded.count() == 10
    assert set(discarded.values_list("discarded_by", flat=True)) == {
        "operator@example.com"
    }
    assert LogEntry.objects.count() == 10
    # Discarded events are dealt with: they leave the dead letters.
    assert [group.error_class for group in monitoring.failure_groups()] == [
        "TimeoutError"
    ]


def test_dead_letters__leave_discarded_and_unfailed_events_out() -> None:
    OutboxEventFactory.create_batch(2, failed=True)
    discard_events([OutboxEventFactory.create(failed=True).pk], actor="someone")
    OutboxEventFactory.create(last_error="ConnectionError: smtp down", attempts=1)

    assert [group.count for group in monitoring.failure_groups()] == [2]


def test_dead_letters__group_by_event_type_too() -> None:
    OutboxEventFactory.create_batch(2, failed=True, event_type="mail.send")
    OutboxEventFactory.create(failed=True, event_type="sms.send")

    groups = monitoring.failure_groups()

    assert [(group.event_type, group.count) for group in groups] == [
        ("mail.send", 2),
        ("sms.send", 1),
    ]


def test_discard_failed_view__needs_the_discard_permission(make_staff) -> None:
    client = make_staff(
        "retrier", permissions=("view_outboxevent", "retry_outboxevent")
    )
    event = OutboxEventFactory.create(failed=True)

    shown = client.get(reverse(DISCARD_FAILED))
    posted = client.post(reverse(DISCARD_FAILED), {"confirmed_count": "1"})
    page = client.get(reverse(DEAD_LETTERS)).content.decode()

    assert (shown.status_code, posted.status_code) == (403, 403)
    event.refresh_from_db()
    assert event.discarded_at is None
    assert "outbox-group-retry" in page
    assert "outbox-group-discard" not in page


def test_dead_letters_view__needs_the_view_permission(make_staff) -> None:
    client = make_staff("nobody")

    assert client.get(reverse(DEAD_LETTERS)).status_code == 403


def test_held_keys__count_the_events_behind_a_retrying_head(register_handler) -> None:
    def handle(event: OutboxEvent) -> None:
        if event.payload["n"] == 0:
            raise TimeoutError("gateway timed out after 30 s")

    register_handler("order.sync", handle)
    for n in range(4):
        publish("order.sync", {"n": n}, key="order-7")
    publish("order.sync", {"n": 9}, key="order-8")
    drain()  # the head fails its first attempt and waits for its retry

    held = monitoring.held_keys()

    assert [(entry.key, entry.waiting) for entry in held] == [("order-7", 3)]
    head = held[0].head
    assert head.attempts == 1
    assert head.error_cause == "TimeoutError: gateway timed out after <n> s"


def test_held_keys__are_not_hidden_behind_retrying_heads_that_hold_nothing(
    register_handler,
) -> None:
    def handle(event: OutboxEvent) -> None:
        if event.payload["n"] == 0:
            raise TimeoutError("down")

    register_handler("order.sync", handle)
    publish_many(
        [NewEvent("order.sync", {"n": 0}, key=f"lonely-{n}") for n in range(5)]
        + [NewEvent("order.sync", {"n": n}, key="hot") for n in range(4)]
    )
    drain()

    held = monitoring.held_keys(limit=2)

    assert [(entry.key, entry.waiting) for entry in held] == [("hot", 3)]


def test_held_keys__count_up_to_a_cap(register_handler, monkeypatch) -> None:
    def handle(event: OutboxEvent) -> None:
        raise TimeoutError("down")

    register_handler("order.sync", handle)
    monkeypatch.setattr(monitoring, "HELD_COUNT_CAP", 2)
    publish_many([NewEvent("order.sync", {"n": n}, key="hot") for n in range(6)])
    drain()

    (held,) = monitoring.held_keys()

    assert (held.waiting, held.waiting_capped) == (3, True)


def test_dead_letters__a_groups_list_matches_its_count(operator) -> None:
    OutboxEventFactory.create_batch(2, failed=True)
    discard_events([OutboxEventFactory.create(failed=True).pk], actor="someone")
    html = operator.get(reverse(DEAD_LETTERS)).content.decode()
    show = re.search(r'href="([^"]*)" class="outbox-group-events"', html)
    assert show is not None

    listed = operator.get(show[1].replace("&amp;", "&")).context["cl"].result_list

    assert len(listed) == 2


def test_held_keys__a_head_failed_for_good_holds_nothing_back(register_handler) -> None:
    def handle(event: OutboxEvent) -> None:
        if event.payload["n"] == 0:
            raise TimeoutError("down")

    register_handler("order.sync", handle, max_attempts=1)
    for n in range(3):
        publish("order.sync", {"n": n}, key="order-7")
    drain()

    assert monitoring.held_keys() == []
    assert OutboxEvent.objects.filter(status=Status.COMPLETED).count() == 2


def test_dead_letters_view__shows_the_held_keys(register_handler, operator) -> None:
    def handle(event: OutboxEvent) -> None:
        raise TimeoutError("down")

    register_handler("order.sync", handle)
    for n in range(3):
        publish("order.sync", {"n": n}, key="order-7")
    drain()

    html = operator.get(reverse(DEAD_LETTERS)).content.decode()

    assert html.count('class="outbox-held-key"') == 1
    assert 'data-count="held">2<' in html
    assert "order-7" in html


@pytest.mark.sqlite
def test_migration__gives_failed_and_retrying_events_their_cause(monkeypatch) -> None:
    migration = importlib.import_module("outbox.migrations.0013_error_causes")
    monkeypatch.setattr(migration, "CHUNK", 2)  # several chunks
    failed = OutboxEventFactory.create_batch(
        3, failed=True, last_error="TimeoutError: after 30 s", error_cause=""
    )
    retrying = OutboxEventFactory.create(last_error="KeyError: 'x'", attempts=1)
    completed = OutboxEventFactory.create(
        completed=True, last_error="TimeoutError: after 30 s"
    )

    migration.backfill_causes(apps, connection.schema_editor())

    causes = dict(OutboxEvent.objects.values_list("pk", "error_cause"))
    assert [causes[event.pk] for event in failed] == ["TimeoutError: after <n> s"] * 3
    assert causes[retrying.pk] == "KeyError: '…'"
    assert causes[completed.pk] == ""  # done with: nobody groups it


def test_group_retry__audits_each_chunk_with_its_change(monkeypatch) -> None:
    """A request killed halfway (here: the second chunk's audit raises) leaves
    every change it committed in the audit trail, and nothing else changed."""
    monkeypatch.setattr(operations, "CHUNK", 2)
    events = OutboxEventFactory.create_batch(5, failed=True)
    audited: list[list[int]] = []

    def audit(changed: list[int]) -> None:
        if audited:
            raise RuntimeError("the request was killed")
        audited.append(changed)

    with pytest.raises(RuntimeError):
        retry_events([event.pk for event in events], actor="operator", audit=audit)

    pending = set(
        OutboxEvent.objects.filter(status=Status.PENDING).values_list("pk", flat=True)
    )
    assert audited == [[events[0].pk, events[1].pk]]
    assert pending == {events[0].pk, events[1].pk}
