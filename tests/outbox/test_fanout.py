"""Fan-out: several named subscribers of one event type, each with a delivery
of its own (outbox/registry.py, publishing.py, ordering.py's lanes)."""

import json
import re
from io import StringIO
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.db import transaction
from django.urls import reverse

from outbox import handler, monitoring, publish, publish_many, registry
from outbox.models import OutboxEvent, Status
from outbox.operations import retry_events
from outbox.publishing import NewEvent
from outbox.testing import drain
from tests.outbox.sessions import InThread, backend_pid, waiting_for_a_lock
from tests.outbox.worker_process import WorkerProcess, wait_until
from tests.outbox_app.models import HandlerRun

pytestmark = pytest.mark.django_db


def email(event) -> None:
    """A handler."""


def crm(event) -> None:
    """Another handler."""


@pytest.fixture
def calls(register_handler) -> dict[str, list[tuple[int, int]]]:
    """Subscribe "" (mail), "crm-sync" and "audit" to test.joined; record
    (payload n, attempt) per call; "crm-sync" fails while payload["crm_down"]."""
    seen: dict[str, list[tuple[int, int]]] = {"": [], "crm-sync": [], "audit": []}

    def subscriber(name: str):
        def handle(event: OutboxEvent) -> None:
            seen[name].append((event.payload["n"], event.attempts))
            if name == "crm-sync" and event.payload.get("crm_down"):
                raise ConnectionError(f"CRM refused event {event.payload['n']}")

        return handle

    register_handler("test.joined", subscriber(""))
    register_handler("test.joined", subscriber("crm-sync"), name="crm-sync")
    register_handler("test.joined", subscriber("audit"), name="audit", max_attempts=2)
    return seen


# -- the registry -------------------------------------------------------------


@pytest.fixture
def forget():
    yield
    registry.unregister("thing.done")


def test_handler__named_handlers_subscribe_beside_the_unnamed_one(forget) -> None:
    handler("thing.done")(email)
    handler("thing.done", name="crm-sync")(crm)

    assert registry.subscribers("thing.done") == ("", "crm-sync")
    unnamed = registry.get_handler("thing.done")
    assert unnamed is not None and unnamed.function is email
    named = registry.get_handler("thing.done", "crm-sync")
    assert named is not None and named.function is crm
    assert registry.subscribers("nobody.listens") == ("",)


def test_handler__two_handlers_of_one_name_are_an_error_naming_both(forget) -> None:
    handler("thing.done", name="crm-sync")(email)

    with pytest.raises(ImproperlyConfigured) as raised:
        handler("thing.done", name="crm-sync")(crm)

    message = str(raised.value)
    assert "tests.outbox.test_fanout.email" in message
    assert "tests.outbox.test_fanout.crm" in message
    assert "'crm-sync'" in message


def test_handler__two_unnamed_handlers_are_an_error_that_suggests_names(forget) -> None:
    handler("thing.done")(email)

    with pytest.raises(ImproperlyConfigured, match="give each of several a name"):
        handler("thing.done")(crm)


@pytest.mark.parametrize("name", ["", "has space", "-leading", "x" * 101, "a/b", 7])
def test_handler__refuses_a_name_that_is_not_short_and_plain(name, forget) -> None:
    with pytest.raises(ValueError, match="a subscriber's name is 1 to 100"):
        handler("thing.done", name=name)


# -- publishing -----------------------------------------------------------------


@pytest.mark.sqlite
def test_publish__writes_one_delivery_per_subscriber_sharing_the_events_uuid(
    calls,
) -> None:
    event = publish("test.joined", {"n": 1}, key="user-1")

    rows = OutboxEvent.objects.filter(uuid=event.uuid).order_by("subscriber")
    assert [row.subscriber for row in rows] == ["", "audit", "crm-sync"]
    assert event.subscriber == ""  # publish() returns the first delivery
    assert [row.max_attempts for row in rows] == [10, 2, 10]
    assert {row.key for row in rows} == {"user-1"}
    assert not any(row.waiting for row in rows)  # each heads its own lane


def test_publish__an_idempotency_key_stays_one_event(calls, register_handler) -> None:
    first = publish("test.joined", {"n": 1}, idempotency_key="invite-1")
    register_handler("test.joined", email, name="late-comer")

    again = publish("test.joined", {"n": 1}, idempotency_key="invite-1")

    assert again.pk == first.pk
    assert OutboxEvent.objects.count() == 3  # the late subscriber gets none


def test_publish_many__writes_every_events_deliveries(calls) -> None:
    events = publish_many(
        [NewEvent("test.joined", {"n": n}, key="user-1") for n in range(3)]
        + [NewEvent("test.joined", {"n": 9}, idempotency_key="invite-9")] * 2
    )

    assert OutboxEvent.objects.count() == 4 * 3
    assert len({event.uuid for event in events}) == 4
    assert events[3].pk == events[4].pk
    waiting = OutboxEvent.objects.filter(waiting=True)
    # In each subscriber's lane of user-1, the first event heads, two wait.
    assert sorted(waiting.values_list("subscriber", flat=True)) == sorted(
        ["", "", "audit", "audit", "crm-sync", "crm-sync"]
    )


# -- delivering -----------------------------------------------------------------


def test_drain__delivers_each_event_to_every_subscriber_once(calls) -> None:
    for n in range(3):
        publish("test.joined", {"n": n})

    result = drain()

    assert result.completed == 9
    assert {name: sorted(seen) for name, seen in calls.items()} == {
        name: [(0, 1), (1, 1), (2, 1)] for name in calls
    }


def test_one_subscribers_failure__does_not_rerun_delay_or_fail_the_others(
    calls,
) -> None:
    event = publish("test.joined", {"n": 1, "crm_down": True}, max_attempts=3)

    first = drain()
    for _ in range(5):  # the retries, as their backoff lets them
        OutboxEvent.objects.filter(status=Status.PENDING).update(
            available_at=event.created_at
        )
        drain()

    assert (first.completed, first.retried) == (2, 1)
    assert calls[""] == [(1, 1)] and calls["audit"] == [(1, 1)]
    assert calls["crm-sync"] == [(1, 1), (1, 2), (1, 3)]
    statuses = dict(
        OutboxEvent.objects.filter(uuid=event.uuid).values_list("subscriber", "status")
    )
    assert statuses == {
        "": Status.COMPLETED,
        "audit": Status.COMPLETED,
        "crm-sync": Status.FAILED,
    }


def test_operator_retry__of_one_delivery_leaves_the_others_alone(calls) -> None:
    event = publish("test.joined", {"n": 1, "crm_down": True}, max_attempts=1)
    drain()
    failed = OutboxEvent.objects.get(uuid=event.uuid, status=Status.FAILED)

    result = retry_events([failed.pk], actor="operator")
    drain()

    assert result.changed == [failed.pk]
    assert calls["crm-sync"] == [(1, 1), (1, 1)]
    assert calls[""] == [(1, 1)] and calls["audit"] == [(1, 1)]


def test_order_per_key__holds_per_subscriber_and_one_lane_does_not_block_another(
    calls,
) -> None:
    for n in range(3):
        publish("test.joined", {"n": n, "crm_down": n == 0}, key="user-1")

    drain()  # crm-sync's first event fails and waits for its retry

    assert calls[""] == [(0, 1), (1, 1), (2, 1)]
    assert calls["audit"] == [(0, 1), (1, 1), (2, 1)]
    assert calls["crm-sync"] == [(0, 1)]  # its later events wait behind it
    OutboxEvent.objects.filter(subscriber="crm-sync", payload__n=0).update(
        payload={"n": 0}
    )
    OutboxEvent.objects.filter(status=Status.PENDING).update(
        available_at=OutboxEvent.objects.first().created_at  # type: ignore[union-attr]
    )
    drain()
    assert calls["crm-sync"] == [(0, 1), (0, 2), (1, 1), (2, 1)]


def test_unknown_subscriber__fails_its_delivery_naming_it(calls) -> None:
    event = publish("test.joined", {"n": 1}, max_attempts=1)
    registry.unregister("test.joined", "audit")

    drain()

    row = OutboxEvent.objects.get(uuid=event.uuid, subscriber="audit")
    assert row.status == Status.FAILED
    assert "no handler named 'audit' registered for 'test.joined'" in row.last_error


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_worker_process__a_flaky_subscriber_retries_alone(tmp_path, workers) -> None:
    log = tmp_path / "log"
    worker = WorkerProcess("--concurrency", "4", "--stuck-timeout-ms", "1500")
    workers.append(worker)
    events = publish_many(
        [NewEvent("outbox_testapp.fanout", {"log": str(log)}) for _ in range(20)]
    )
    wait_until(
        lambda: OutboxEvent.objects.filter(status=Status.COMPLETED).count() == 40,
        context=lambda: worker.output,
    )
    assert worker.stop() == 0

    lines = Path(log).read_text().split()
    calls = list(zip(lines[0::3], lines[1::3], lines[2::3], strict=True))
    for event in events:
        uuid = str(event.uuid)
        assert [call for call in calls if call[:2] == ("steady", uuid)] == [
            ("steady", uuid, "1")
        ]
        assert sorted(call for call in calls if call[:2] == ("flaky", uuid)) == [
            ("flaky", uuid, "1"),
            ("flaky", uuid, "2"),
        ]
    assert HandlerRun.objects.count() == 40


# -- the operator's view --------------------------------------------------------


def test_admin__an_events_page_lists_its_deliveries(calls, viewer) -> None:
    event = publish("test.joined", {"n": 1, "crm_down": True}, max_attempts=1)
    drain()
    crm_row = OutboxEvent.objects.get(uuid=event.uuid, subscriber="crm-sync")

    html = viewer.get(
        reverse("admin:outbox_outboxevent_change", args=[crm_row.pk])
    ).content.decode()

    table = html[html.index('<table class="outbox-deliveries">') :]
    table = table[: table.index("</table>")]
    assert table.count("<tr") == 4  # the header and three deliveries
    assert "(unnamed handler)" in table and "audit" in table
    assert table.count("Completed") == 2 and table.count("Failed") == 1
    assert 'class="outbox-delivery-this"' in table


def test_admin__filters_by_subscriber(calls, viewer) -> None:
    publish("test.joined", {"n": 1})
    url = reverse("admin:outbox_outboxevent_changelist")

    named = viewer.get(url, {"subscriber": "audit"}).context["cl"].result_list
    unnamed = viewer.get(url, {"subscriber": "-"}).context["cl"].result_list

    assert [row.subscriber for row in named] == ["audit"]
    assert [row.subscriber for row in unnamed] == [""]


def test_dead_letters__group_by_subscriber_and_retry_only_its_deliveries(
    calls, register_handler, operator
) -> None:
    def refuse(event: OutboxEvent) -> None:
        raise ConnectionError(f"CRM refused event {event.payload['n']}")

    registry.unregister("test.joined", "audit")
    register_handler("test.joined", refuse, name="audit", max_attempts=1)
    for n in range(3):
        publish("test.joined", {"n": n, "crm_down": True}, max_attempts=1)
    drain()

    groups = monitoring.failure_groups()
    assert [(group.subscriber, group.count) for group in groups] == [
        ("audit", 3),
        ("crm-sync", 3),
    ]
    html = operator.get(reverse("admin:outbox_outboxevent_dead_letters")).content
    links = re.findall(r'href="([^"]*)" class="outbox-group-retry"', html.decode())
    url = links[1].replace("&amp;", "&")
    assert operator.get(url).context["count"] == 3
    operator.post(url, {"confirmed_count": "3"})

    pending = OutboxEvent.objects.filter(status=Status.PENDING)
    assert set(pending.values_list("subscriber", flat=True)) == {"crm-sync"}
    assert pending.count() == 3


def test_outbox_status__counts_deliveries_per_subscriber(calls) -> None:
    publish("test.joined", {"n": 1, "crm_down": True}, max_attempts=1)
    publish("test.joined", {"n": 2})
    drain(max_events=4)  # n=1's three deliveries, n=2's unnamed one

    counts = monitoring.count_by_status()
    text, data = StringIO(), StringIO()
    call_command("outbox_status", stdout=text)
    call_command("outbox_status", "--json", stdout=data)

    assert (counts.pending, counts.failed, counts.completed) == (2, 1, 3)
    assert counts.by_subscriber == {  # those with open deliveries
        "audit": {"pending": 1, "processing": 0, "failed": 0},
        "crm-sync": {"pending": 1, "processing": 0, "failed": 1},
    }
    assert json.loads(data.getvalue())["subscribers"] == counts.by_subscriber
    lines = text.getvalue().splitlines()
    assert "deliveries by subscriber (pending / processing / failed):" in lines
    assert "  crm-sync   1 / 0 / 1" in lines


@pytest.mark.django_db(transaction=True)
def test_publish__a_lost_idempotency_race_with_several_subscribers_writes_nothing(
    calls,
) -> None:
    """The loser's three-row INSERT waits on the winner's uncommitted rows, then
    returns the winner's event; its transaction goes on."""
    backend: list[int] = []
    results: dict[str, object] = {}

    @transaction.atomic
    def lose() -> None:
        backend.append(backend_pid())
        results["loser"] = publish("test.joined", {"n": 2}, idempotency_key="race").uuid
        results["after"] = publish("test.joined", {"n": 3}).pk

    with transaction.atomic():
        winner = publish("test.joined", {"n": 1}, idempotency_key="race")
        results["winner"] = winner.uuid
        loser = InThread(lose)
        wait_until(lambda: bool(backend) and waiting_for_a_lock(backend[0]))
    loser.join()

    assert results["loser"] == results["winner"]
    assert "after" in results
    raced = OutboxEvent.objects.filter(idempotency_key="race")
    subscribers = sorted(raced.values_list("subscriber", flat=True))
    assert subscribers == ["", "audit", "crm-sync"]
    assert {row.payload["n"] for row in raced} == {1}
    assert OutboxEvent.objects.count() == 6
