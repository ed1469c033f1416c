"""The three workflows that define the pattern, end to end on PostgreSQL."""

from datetime import timedelta

import pytest
from django.core.mail.backends import locmem
from django.db import transaction
from django.utils import timezone

from organizations import emails, services
from organizations.models import AuditEntry, Invitation, Project
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


@pytest.mark.parametrize(
    "call_service",
    [
        # A plain event and one with an idempotency key take different
        # paths through publish(); both must stay in the caller's transaction.
        lambda admin, organization: services.create_project(
            actor=admin, organization=organization, name="Apollo"
        ),
        lambda admin, organization: services.invite_member(
            actor=admin,
            organization=organization,
            email="new@example.com",
            role="member",
        ),
    ],
    ids=["create_project", "invite_member"],
)
def test_rollback__a_failure_after_the_event_was_published_leaves_nothing(
    admin, organization, monkeypatch, mailoutbox, call_service
):
    published = []

    def publish_then_fail(*args, **kwargs):
        published.append(real_publish(*args, **kwargs))
        raise ForcedFailure("the service failed after publishing")

    real_publish = services.publish
    monkeypatch.setattr(services, "publish", publish_then_fail)

    with pytest.raises(ForcedFailure):
        call_service(admin, organization)
    drain()

    [event] = published  # the event was written, inside the service's transaction
    assert event.pk is not None
    assert not OutboxEvent.objects.exists()
    assert not Project.objects.exists()
    assert not Invitation.objects.exists()
    assert not AuditEntry.objects.exists()
    assert mailoutbox == []


def test_rollback__a_callers_transaction_that_fails_after_the_service_leaves_nothing(
    admin, organization, mailoutbox
):
    with pytest.raises(ForcedFailure), transaction.atomic():
        services.create_project(actor=admin, organization=organization, name="Apollo")
        raise ForcedFailure("the caller failed after the service returned")
    drain()

    assert not Project.objects.exists()
    assert not AuditEntry.objects.exists()
    assert not OutboxEvent.objects.exists()
    assert mailoutbox == []


class WorkerDied(BaseException):
    """The worker process ends here: nothing after it runs, nothing catches it."""


def test_crash_recovery__a_worker_dying_after_the_email_resends_it_with_one_message_id(
    api_as, admin, mailoutbox, monkeypatch
):
    invite(api_as, admin)
    dead = Worker(worker_id="dead", batch_size=1)
    claimed = dead.claim()
    send_messages = locmem.EmailBackend.send_messages

    def send_then_crash(backend, messages):
        send_messages(backend, messages)
        raise WorkerDied  # before the outcome commits

    with monkeypatch.context() as patched:
        patched.setattr(locmem.EmailBackend, "send_messages", send_then_crash)
        with pytest.raises(WorkerDied):
            dead.process(claimed)

    event = OutboxEvent.objects.get()
    assert (event.status, event.attempts, event.locked_by) == (
        Status.PROCESSING,
        1,
        "dead",
    )
    assert len(mailoutbox) == 1
    # The lease runs out: the worker is gone for good.
    OutboxEvent.objects.update(locked_until=timezone.now() - timedelta(seconds=1))
    heir = Worker(worker_id="heir")

    assert heir.rescue_expired() == 1
    # The retry's backoff has passed.
    OutboxEvent.objects.update(available_at=timezone.now() - timedelta(seconds=1))
    assert heir.run_once().completed == 1

    event.refresh_from_db()
    assert (event.status, event.attempts, event.locked_by) == (
        Status.COMPLETED,
        2,
        "heir",
    )
    assert [(entry["worker"], entry["error"]) for entry in event.history] == [
        ("dead", "outbox.errors.LeaseExpired")
    ]
    # At least once: the email went out twice, under one Message-ID that lets
    # the receiver drop the copy.
    assert [mail.to for mail in mailoutbox] == [["new@example.com"]] * 2
    assert [mail.extra_headers["Message-ID"] for mail in mailoutbox] == [
        emails.message_id(event.uuid)
    ] * 2
    assert Invitation.objects.count() == 1
    assert AuditEntry.objects.filter(action="invitation.created").count() == 1
    assert OutboxEvent.objects.count() == 1
