"""The three workflows that define the pattern, end to end on PostgreSQL."""

import time
from datetime import timedelta

import pytest
from django.test import override_settings
from django.utils import timezone

from organizations import services
from organizations.models import AuditEntry, Invitation
from outbox.models import OutboxEvent, Status
from outbox.testing import drain
from outbox.worker import Worker

pytestmark = pytest.mark.django_db(transaction=True)


class ForcedFailure(Exception):  # noqa: N818 - a test's own failure
    pass


def invite(api_as, admin):
    return api_as(admin).post(
        "organizations/acme/invitations", {"email": "new@example.com", "role": "member"}
    )


def test_happy_path__one_invitation_one_event_one_email(api_as, admin, mailoutbox):
    response = invite(api_as, admin)

    assert response.status_code == 201
    assert Invitation.objects.count() == 1
    assert AuditEntry.objects.filter(action="invitation.created").count() == 1
    [event] = OutboxEvent.objects.filter(event_type="user.invited")
    assert event.status == Status.PENDING
    assert mailoutbox == []  # the view sent nothing itself

    drain()

    event.refresh_from_db()
    assert event.status == Status.COMPLETED
    assert [mail.to for mail in mailoutbox] == [["new@example.com"]]


def test_rollback__a_failure_after_the_first_write_leaves_nothing(
    api_as, admin, organization, monkeypatch, mailoutbox
):
    def fail(*args, **kwargs):
        raise ForcedFailure("the audit trail is down")

    monkeypatch.setattr(services, "_audit", fail)

    with pytest.raises(ForcedFailure):
        services.invite_member(
            actor=admin,
            organization=organization,
            email="new@example.com",
            role="member",
        )
    drain()

    assert not Invitation.objects.exists()
    assert not AuditEntry.objects.filter(action="invitation.created").exists()
    assert not OutboxEvent.objects.exists()
    assert mailoutbox == []


@override_settings(OUTBOX={"BACKOFF_BASE_MS": 1, "BACKOFF_CAP_MS": 5})
def test_crash_recovery__a_dead_workers_event_is_sent_once(api_as, admin, mailoutbox):
    invite(api_as, admin)
    Worker(worker_id="dead").claim()  # claims, then the process dies
    OutboxEvent.objects.update(locked_until=timezone.now() - timedelta(seconds=1))
    heir = Worker(worker_id="heir")

    heir.run_once()  # rescues the event
    time.sleep(0.01)
    heir.run_once()  # and handles it

    event = OutboxEvent.objects.get()
    assert (event.status, event.attempts, event.locked_by) == (
        Status.COMPLETED,
        2,
        "heir",
    )
    assert event.history[0]["worker"] == "dead"
    assert len(mailoutbox) == 1
