"""The operator's console: outbox/admin.py."""

from datetime import timedelta

import pytest
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.auth.models import Group, Permission
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from outbox import monitoring, publish
from outbox.models import OutboxEvent, Status
from outbox.operations import discard_events
from tests.outbox.factories import OutboxEventFactory, OutboxWorkerFactory

pytestmark = pytest.mark.django_db

CHANGELIST = "admin:outbox_outboxevent_changelist"
RETRY_FAILED = "admin:outbox_outboxevent_retry_failed"


@pytest.fixture
def make_staff(django_user_model, django_username_field):
    """Return a factory of logged-in clients, one per staff member."""

    def make(name: str, *, permissions=(), groups=()):
        user = django_user_model.objects.create_user(
            **{django_username_field: f"{name}@example.com"},
            password="a-long-password-1",
            is_staff=True,
        )
        user.user_permissions.add(
            *Permission.objects.filter(
                content_type__app_label="outbox", codename__in=permissions
            )
        )
        user.groups.add(*Group.objects.filter(name__in=groups))
        client = Client()
        client.force_login(user)
        return client

    return make


@pytest.fixture
def viewer(make_staff):
    """A staff member who may only look at events and workers."""
    return make_staff("viewer", permissions=("view_outboxevent", "view_outboxworker"))


@pytest.fixture
def operator(make_staff):
    """A member of the group that migration 0004 creates."""
    return make_staff("operator", groups=("Outbox operators",))


def changelist(client, **params):
    response = client.get(reverse(CHANGELIST), params)
    assert response.status_code == 200
    return response


def listed(response) -> set[int]:
    return {event.pk for event in response.context["cl"].result_list}


def run_action(client, action: str, events):
    return client.post(
        reverse(CHANGELIST),
        {"action": action, "_selected_action": [event.pk for event in events]},
        follow=True,
    )


def test_operators_group__holds_view_retry_and_discard() -> None:
    group = Group.objects.get(name="Outbox operators")

    assert set(group.permissions.values_list("codename", flat=True)) == {
        "view_outboxevent",
        "retry_outboxevent",
        "discard_outboxevent",
        "view_outboxworker",
    }


def test_changelist__renders_for_a_viewer_without_actions(viewer) -> None:
    event = OutboxEventFactory.create(failed=True)

    response = changelist(viewer)

    html = response.content.decode()
    assert str(event.uuid) in html
    assert "ConnectionError: smtp down" in html
    assert "10 / 10" in html
    assert 'value="retry_now"' not in html
    assert "Retry all failed events" not in html


def test_changelist__summary_counts_each_status(viewer) -> None:
    OutboxEventFactory.create_batch(2)
    OutboxEventFactory.create(leased=True)
    failed = OutboxEventFactory.create_batch(3, failed=True)
    discard_events([failed[0].pk], actor="ops")
    OutboxEventFactory.create_batch(4, completed=True)

    summary = changelist(viewer).context["summary"]

    assert summary == monitoring.StatusCounts(
        pending=2,
        processing=1,
        failed=3,
        discarded=1,
        completed=4,
        completed_exact=True,
    )


def test_changelist__filters_by_status_type_date_and_error(viewer) -> None:
    failed = OutboxEventFactory.create(failed=True, event_type="mail.send")
    pending = OutboxEventFactory.create(event_type="mail.send")
    old = OutboxEventFactory.create(completed=True, event_type="sms.send")
    OutboxEvent.objects.filter(pk=old.pk).update(
        created_at=timezone.now() - timedelta(days=30)
    )
    retried = OutboxEventFactory.create(completed=True, last_error="Boom: once")

    assert listed(changelist(viewer, status__exact="failed")) == {failed.pk}
    assert listed(changelist(viewer, event_type="mail.send")) == {
        failed.pk,
        pending.pk,
    }
    assert listed(changelist(viewer, has_error="yes")) == {failed.pk, retried.pk}
    assert failed.pk not in listed(changelist(viewer, has_error="no"))
    # What the filter's "Past 7 days" link sends: an aware datetime.
    since = str(timezone.now() - timedelta(days=7))
    assert old.pk not in listed(changelist(viewer, created_at__gte=since))
    assert old.pk in listed(changelist(viewer))


def test_changelist__event_type_filter_offers_the_registered_types(
    viewer, register_handler
) -> None:
    register_handler("mail.send", lambda event: None)

    response = changelist(viewer)

    assert "?event_type=mail.send" in response.content.decode()


def test_changelist__searches_exact_uuid_key_type_and_idempotency_key(
    viewer,
) -> None:
    event = OutboxEventFactory.create(
        event_type="mail.send", key="org:7", idempotency_key="welcome:7"
    )
    OutboxEventFactory.create(event_type="other", key="org:70")

    for term in (str(event.uuid), "org:7", "mail.send", "welcome:7"):
        assert listed(changelist(viewer, q=term)) == {event.pk}, term
    assert listed(changelist(viewer, q="org")) == set()


def test_changelist__counts_at_most_the_cap(viewer, monkeypatch) -> None:
    monkeypatch.setattr(monitoring, "COUNT_CAP", 3)
    OutboxEventFactory.create_batch(6, completed=True)

    response = changelist(viewer)

    assert response.context["cl"].result_count == 4
    assert "More than 3 events match" in response.content.decode()
    assert response.context["summary"].completed_exact is False


def test_detail__shows_payload_history_and_lease_read_only(viewer) -> None:
    event = OutboxEventFactory.create(
        leased=True,
        payload={"note": "<script>alert(1)</script>", "n": 2},
        last_error="ConnectionError: smtp down",
        history=[
            {
                "attempt": 1,
                "at": "2026-01-01T03:00:00+00:00",
                "worker": "host-7",
                "error": "ConnectionError",
                "message": "smtp down",
            }
        ],
    )

    response = viewer.get(reverse("admin:outbox_outboxevent_change", args=[event.pk]))

    html = response.content.decode()
    assert response.status_code == 200
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script>alert(1)" not in html
    assert "{\n  &quot;n&quot;: 2,\n  &quot;note&quot;" in html
    assert "<td>host-7</td>" in html
    assert "held by host-1 until" in html
    assert "(live)" in html
    assert 'name="_save"' not in html


def test_add_and_delete__are_refused_even_to_a_superuser(admin_client) -> None:
    event = OutboxEventFactory.create()

    add = admin_client.get(reverse("admin:outbox_outboxevent_add"))
    delete = admin_client.post(
        reverse("admin:outbox_outboxevent_delete", args=[event.pk]), {"post": "yes"}
    )

    assert (add.status_code, delete.status_code) == (403, 403)
    assert OutboxEvent.objects.filter(pk=event.pk).exists()


def test_retry_action__retries_the_selected_failed_events_and_logs_it(
    operator,
) -> None:
    chosen = OutboxEventFactory.create(failed=True)
    other = OutboxEventFactory.create(failed=True)
    leased = OutboxEventFactory.create(leased=True)

    response = run_action(operator, "retry_now", [chosen, leased])

    chosen.refresh_from_db()
    other.refresh_from_db()
    leased.refresh_from_db()
    assert (chosen.status, chosen.attempts) == (Status.PENDING, 0)
    assert other.status == Status.FAILED
    assert leased.status == Status.PROCESSING
    message = str(next(iter(response.context["messages"])))
    assert message == (
        "Retried 1 event. Skipped 1 event: 1 processing under a live lease."
    )
    assert chosen.history[-1]["operator"] == "operator@example.com"
    [entry] = LogEntry.objects.all()
    assert (entry.object_id, entry.action_flag) == (str(chosen.pk), CHANGE)


def test_discard_action__discards_pending_events_and_lets_the_key_go_on(
    operator,
) -> None:
    head = publish("step", {}, key="org:1")
    after = publish("step", {}, key="org:1")

    response = run_action(operator, "discard", [head])

    head.refresh_from_db()
    assert head.status == Status.FAILED
    assert head.discarded_by == "operator@example.com"
    assert list(OutboxEvent.objects.ready()) == [after]
    assert "Discarded 1 event." in response.content.decode()
    assert LogEntry.objects.get().object_id == str(head.pk)


@pytest.mark.parametrize("action", ["retry_now", "discard"])
def test_actions__are_refused_without_the_permission(viewer, action) -> None:
    event = OutboxEventFactory.create(failed=True)

    run_action(viewer, action, [event])

    event.refresh_from_db()
    assert (event.status, event.attempts, event.discarded_at) == (
        Status.FAILED,
        10,
        None,
    )
    assert not LogEntry.objects.exists()


def test_retry_failed_view__retries_every_failed_event_the_filter_matches(
    operator,
) -> None:
    mail = OutboxEventFactory.create_batch(3, failed=True, event_type="mail.send")
    sms = OutboxEventFactory.create(failed=True, event_type="sms.send")

    response = operator.post(reverse(RETRY_FAILED) + "?event_type=mail.send")

    assert response.status_code == 302
    assert response["Location"].endswith("?event_type=mail.send")
    statuses = dict(OutboxEvent.objects.values_list("pk", "status"))
    assert {statuses[event.pk] for event in mail} == {Status.PENDING}
    assert statuses[sms.pk] == Status.FAILED
    assert LogEntry.objects.count() == 3


def test_retry_failed_view__is_shown_to_operators(operator) -> None:
    html = changelist(operator, status__exact="failed").content.decode()

    assert reverse(RETRY_FAILED) + "?status__exact=failed" in html


def test_retry_failed_view__needs_post_and_the_permission(viewer, operator) -> None:
    event = OutboxEventFactory.create(failed=True)

    assert operator.get(reverse(RETRY_FAILED)).status_code == 405
    assert viewer.post(reverse(RETRY_FAILED)).status_code == 403
    event.refresh_from_db()
    assert event.status == Status.FAILED


def test_retry_failed_view__reports_an_unknown_filter(operator) -> None:
    response = operator.post(reverse(RETRY_FAILED) + "?nonsense=1", follow=True)

    assert "Unknown filter." in response.content.decode()


def test_worker_admin__lists_workers_and_whether_they_are_alive(viewer) -> None:
    OutboxWorkerFactory.create(worker_id="alive-1")
    OutboxWorkerFactory.create(
        worker_id="dead-1", last_seen_at=timezone.now() - timedelta(hours=1)
    )

    response = viewer.get(reverse("admin:outbox_outboxworker_changelist"))

    html = response.content.decode()
    assert response.status_code == 200
    assert "alive-1" in html and "dead-1" in html
    assert html.count('alt="True"') == 1
    assert html.count('alt="False"') == 1
