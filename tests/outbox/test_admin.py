"""The operator's console: outbox/admin.py."""

import re
from datetime import timedelta
from html import unescape

import pytest
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.auth.models import Group, Permission
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from outbox import monitoring, publish
from outbox.models import OutboxEvent, Status
from outbox.operations import discard_events
from tests import conftest
from tests.outbox.factories import OutboxEventFactory, OutboxWorkerFactory

pytestmark = pytest.mark.django_db

CHANGELIST = "admin:outbox_outboxevent_changelist"
RETRY_FAILED = "admin:outbox_outboxevent_retry_failed"


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


def test_operators_group__holds_view_retry_and_discard(run_group_migration) -> None:
    # As on a fresh database, where 0007 runs before post_migrate has created
    # any permission: the migration must create the ones it grants.
    Group.objects.filter(name=conftest.group_migration.GROUP).delete()
    Permission.objects.filter(content_type__app_label="outbox").delete()

    group = Group.objects.get(name=run_group_migration())

    assert group.name == "Outbox operators"
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

    response = changelist(viewer)

    assert response.context["summary"] == monitoring.StatusCounts(
        pending=2,
        processing=1,
        failed=3,
        discarded=1,
        completed=4,
        completed_exact=True,
    )
    html = response.content.decode()
    for status, count in [("pending", 2), ("processing", 1), ("failed", 3)]:
        assert f'<strong data-count="{status}">{count}</strong>' in html
    assert '<strong data-count="completed">4</strong>' in html
    assert "(1 discarded)" in html


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


def test_changelist__filters_tasks_from_events_and_shows_the_queue(viewer) -> None:
    event = OutboxEventFactory.create(event_type="mail.send")
    task = OutboxEventFactory.create(event_type="task:myapp.tasks.digest")
    OutboxEvent.objects.filter(pk=task.pk).update(queue_name="reports")

    assert listed(changelist(viewer, kind="tasks")) == {task.pk}
    assert listed(changelist(viewer, kind="events")) == {event.pk}
    assert '<td class="field-queue_name">reports</td>' in (
        changelist(viewer).content.decode()
    )


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
    assert "none (published outside a traced span)" in html


def test_detail__shows_the_publishing_spans_traceparent(viewer) -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    event = OutboxEventFactory.create(trace_context={"traceparent": traceparent})

    response = viewer.get(reverse("admin:outbox_outboxevent_change", args=[event.pk]))

    assert traceparent in response.content.decode()


def test_add_and_delete__are_refused_even_to_a_superuser(admin_client) -> None:
    event = OutboxEventFactory.create()

    add = admin_client.get(reverse("admin:outbox_outboxevent_add"))
    delete = admin_client.post(
        reverse("admin:outbox_outboxevent_delete", args=[event.pk]), {"post": "yes"}
    )

    assert (add.status_code, delete.status_code) == (403, 403)
    assert OutboxEvent.objects.filter(pk=event.pk).exists()


def test_change__is_refused_even_to_a_superuser(admin_client) -> None:
    event = OutboxEventFactory.create(failed=True, key="org:1")
    # A complete, valid edit of the fields the change form would offer.
    edit = {
        "event_type": "test.event",
        "key": "",
        "available_at_0": "2030-01-01",
        "available_at_1": "00:00:00",
        "created_at_0": "2030-01-01",
        "created_at_1": "00:00:00",
        "last_error": "",
    }

    response = admin_client.post(
        reverse("admin:outbox_outboxevent_change", args=[event.pk]), edit
    )

    assert response.status_code == 403
    event.refresh_from_db()
    assert (event.key, event.last_error) == ("org:1", "ConnectionError: smtp down")


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
    assert entry.get_change_message() == "Retried (operator action)."


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


@pytest.mark.parametrize(
    ("action", "other_permission"),
    [("retry_now", "discard_outboxevent"), ("discard", "retry_outboxevent")],
)
def test_actions__are_refused_without_their_own_permission(
    make_staff, action, other_permission
) -> None:
    # The other action's permission keeps the actions form live, so the POST
    # is refused for lack of this action's permission, not for want of a form.
    client = make_staff("half", permissions=("view_outboxevent", other_permission))
    event = OutboxEventFactory.create(failed=True)

    run_action(client, action, [event])

    event.refresh_from_db()
    assert (event.status, event.attempts, event.discarded_at) == (
        Status.FAILED,
        10,
        None,
    )
    assert not LogEntry.objects.exists()


def confirm_retry_failed(client, query: str = ""):
    """Open the confirmation page, as an operator does, and confirm its count."""
    url = reverse(RETRY_FAILED) + query
    page = client.get(url)
    assert page.status_code == 200
    return client.post(url, {"confirmed_count": page.context["count"]})


def test_retry_failed_view__retries_every_failed_event_the_filter_matches(
    operator,
) -> None:
    mail = OutboxEventFactory.create_batch(3, failed=True, event_type="mail.send")
    sms = OutboxEventFactory.create(failed=True, event_type="sms.send")

    response = confirm_retry_failed(operator, "?event_type=mail.send")

    assert response.status_code == 302
    assert response["Location"].endswith("?event_type=mail.send")
    statuses = dict(OutboxEvent.objects.values_list("pk", "status"))
    assert {statuses[event.pk] for event in mail} == {Status.PENDING}
    assert statuses[sms.pk] == Status.FAILED
    assert LogEntry.objects.count() == 3
    assert {entry.get_change_message() for entry in LogEntry.objects.all()} == {
        "Retried (operator action)."
    }


def test_retry_failed_view__its_page_confirms_with_a_csrf_checked_post(
    operator, django_user_model, django_username_field
) -> None:
    """The page's own form, posted as a browser would, with CSRF enforced."""
    OutboxEventFactory.create_batch(2, failed=True)
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(
        django_user_model.objects.get(**{django_username_field: "operator@example.com"})
    )
    html = browser.get(reverse(RETRY_FAILED)).content.decode()
    form = re.search(r'<form method="post" action="([^"]*)">(.*?)</form>', html, re.S)
    assert form is not None
    fields = dict(re.findall(r'name="(\w+)" value="([^"]*)"', form[2]))

    response = browser.post(unescape(form[1]), fields)

    assert response.status_code == 302
    assert OutboxEvent.objects.filter(status=Status.PENDING).count() == 2


def test_retry_failed_view__is_shown_to_operators(operator) -> None:
    html = changelist(operator, status__exact="failed").content.decode()

    assert reverse(RETRY_FAILED) + "?status__exact=failed" in html


def test_retry_failed_view__leaves_events_waiting_for_their_retry(operator) -> None:
    later = timezone.now() + timedelta(hours=1)
    waiting = OutboxEventFactory.create(attempts=3, available_at=later)

    confirm_retry_failed(operator)

    waiting.refresh_from_db()
    assert (waiting.attempts, waiting.available_at) == (3, later)
    assert not LogEntry.objects.exists()


def test_retry_failed_view__a_get_shows_the_count_and_retries_nothing(
    operator,
) -> None:
    OutboxEventFactory.create_batch(2, failed=True, event_type="mail.send")
    OutboxEventFactory.create(failed=True, event_type="sms.send")
    discarded = OutboxEventFactory.create(failed=True, event_type="mail.send")
    discard_events([discarded.pk], actor="someone")

    response = operator.get(reverse(RETRY_FAILED) + "?event_type=mail.send")

    assert response.status_code == 200
    html = response.content.decode()
    assert response.context["count"] == 2
    assert '<strong data-count="retry">2</strong> failed events' in html
    assert 'value="Yes, retry 2 events"' in html
    assert "1 discarded event matches this filter too" in html
    assert reverse(RETRY_FAILED) + "?event_type=mail.send" in html  # posts there
    assert set(OutboxEvent.objects.values_list("status", flat=True)) == {Status.FAILED}
    assert not LogEntry.objects.exists()


def test_retry_failed_view__says_when_nothing_matches(operator) -> None:
    OutboxEventFactory.create(completed=True)

    response = operator.get(reverse(RETRY_FAILED))

    assert response.context["count"] == 0
    html = response.content.decode()
    assert "No failed event to retry matches this filter" in html
    assert "confirmed_count" not in html


def test_retry_failed_view__a_post_without_the_confirmation_retries_nothing(
    operator,
) -> None:
    event = OutboxEventFactory.create(failed=True)

    response = operator.post(reverse(RETRY_FAILED))

    assert response.status_code == 200
    assert response.context["count"] == 1
    event.refresh_from_db()
    assert event.status == Status.FAILED
    assert not LogEntry.objects.exists()


def test_retry_failed_view__asks_again_when_the_count_changed(operator) -> None:
    OutboxEventFactory.create_batch(2, failed=True)
    url = reverse(RETRY_FAILED)
    assert operator.get(url).context["count"] == 2
    OutboxEventFactory.create(failed=True)  # fails while the page is open

    again = operator.post(url, {"confirmed_count": "2"})

    assert again.status_code == 200
    assert again.context["count"] == 3
    assert "changed since the page was shown" in again.content.decode()
    assert OutboxEvent.objects.filter(status=Status.FAILED).count() == 3
    assert operator.post(url, {"confirmed_count": "3"}).status_code == 302
    assert OutboxEvent.objects.filter(status=Status.PENDING).count() == 3


@pytest.mark.parametrize(
    "permissions",
    [
        pytest.param(("view_outboxevent", "discard_outboxevent"), id="no-retry"),
        pytest.param(("retry_outboxevent",), id="no-view"),
    ],
)
def test_retry_failed_view__needs_both_the_view_and_the_retry_permission(
    make_staff, permissions
) -> None:
    client = make_staff("half", permissions=permissions)
    event = OutboxEventFactory.create(failed=True)

    shown = client.get(reverse(RETRY_FAILED))
    posted = client.post(reverse(RETRY_FAILED), {"confirmed_count": "1"})

    assert (shown.status_code, posted.status_code) == (403, 403)
    event.refresh_from_db()
    assert event.status == Status.FAILED
    assert not LogEntry.objects.exists()


def test_retry_failed_view__reports_an_unknown_filter(operator) -> None:
    response = operator.get(reverse(RETRY_FAILED) + "?nonsense=1", follow=True)

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
