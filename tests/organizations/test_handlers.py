"""Each event the domain publishes has a handler that sends the right email."""

import smtplib
from datetime import timedelta
from urllib.parse import SplitResult, urlsplit

import pytest
from django.conf import settings
from django.utils import timezone

from organizations import services
from organizations.emails import message_id
from organizations.models import Invitation, Role
from organizations.tokens import read_invitation_token
from outbox import publish
from outbox.models import OutboxEvent, Status
from outbox.testing import drain
from tests.factories import MembershipFactory, UserFactory

pytestmark = pytest.mark.django_db


def only_event(event_type: str) -> OutboxEvent:
    return OutboxEvent.objects.get(event_type=event_type)


def accept_link(body: str) -> SplitResult:
    [url] = [word for word in body.split() if "/invitations/accept" in word]
    return urlsplit(url)


def test_user_invited__mails_a_signed_accept_link(organization, admin, mailoutbox):
    admin.full_name = "Ada Admin"
    admin.save()
    invitation = services.invite_member(
        actor=admin, organization=organization, email="new@example.com", role="member"
    )

    assert drain().completed == 1

    [mail] = mailoutbox
    assert mail.to == ["new@example.com"]
    assert mail.subject == "Ada Admin invited you to Acme"
    assert mail.extra_headers["Message-ID"] == message_id(
        only_event("user.invited").uuid
    )
    token = accept_link(mail.body).fragment.removeprefix("token=")
    assert read_invitation_token(token, max_age=services.invitation_lifetime()) == (
        invitation.pk,
        "new@example.com",
    )
    html, mimetype = mail.alternatives[0]
    assert mimetype == "text/html"
    assert "Accept the invitation" in html
    assert token not in str(only_event("user.invited").payload)


def test_user_invited__carries_the_token_in_the_fragment(
    organization, admin, mailoutbox
):
    services.invite_member(
        actor=admin, organization=organization, email="new@example.com", role="member"
    )
    drain()

    [mail] = mailoutbox
    link = accept_link(mail.body)
    html, _ = mail.alternatives[0]
    assert f"{link.scheme}://{link.netloc}{link.path}" == (
        f"{settings.SITE_URL}/invitations/accept"
    )
    assert link.query == ""
    assert link.fragment.startswith("token=")
    assert len(link.fragment) > len("token=")
    assert f'href="{link.geturl()}"' in html


@pytest.mark.parametrize("field", ["revoked_at", "accepted_at"])
def test_user_invited__a_closed_invitation_sends_nothing(
    organization, admin, mailoutbox, field
):
    invitation = services.invite_member(
        actor=admin, organization=organization, email="new@example.com", role="member"
    )
    setattr(invitation, field, timezone.now())
    invitation.save()

    result = drain()

    assert (result.completed, len(mailoutbox)) == (1, 0)


def test_user_invited__an_expired_invitation_sends_nothing(
    organization, admin, mailoutbox
):
    invitation = services.invite_member(
        actor=admin, organization=organization, email="new@example.com", role="member"
    )
    Invitation.objects.filter(pk=invitation.pk).update(
        created_at=timezone.now() - timedelta(days=9),
        expires_at=timezone.now() - timedelta(seconds=1),
    )

    result = drain()

    assert (result.completed, len(mailoutbox)) == (1, 0)


def test_user_invited__a_deleted_invitation_sends_nothing(
    organization, admin, mailoutbox
):
    invitation = services.invite_member(
        actor=admin, organization=organization, email="new@example.com", role="member"
    )
    invitation.delete()

    assert drain().completed == 1
    assert mailoutbox == []


def test_organization_created__welcomes_the_creator(mailoutbox):
    creator = UserFactory.create(email="founder@example.com")

    services.create_organization(actor=creator, name="Globex", slug="globex")
    drain()

    [mail] = mailoutbox
    assert mail.to == ["founder@example.com"]
    assert "Globex" in mail.subject


def test_organization_created__a_deleted_creator_gets_nothing(mailoutbox):
    creator = UserFactory.create()
    services.create_organization(actor=creator, name="Globex", slug="globex")
    creator.delete()

    assert drain().completed == 1
    assert mailoutbox == []


def test_membership_created__tells_the_admins_who_joined(
    organization, admin, mailoutbox
):
    second_admin = MembershipFactory.create(
        organization=organization, role=Role.ADMIN
    ).user
    MembershipFactory.create(organization=organization, role=Role.MEMBER)
    joiner = UserFactory.create(full_name="Jo Joiner")
    membership = MembershipFactory.create(organization=organization, user=joiner)
    publish(
        "membership.created",
        {"membership_id": membership.pk, "organization_id": organization.pk},
        key=f"org:{organization.pk}",
    )

    drain()

    assert sorted(mail.to[0] for mail in mailoutbox) == sorted(
        [admin.email, second_admin.email]
    )
    assert all("Jo Joiner joined Acme" == mail.subject for mail in mailoutbox)
    ids = {mail.extra_headers["Message-ID"] for mail in mailoutbox}
    assert len(ids) == 2  # one per recipient, each stable across resends


def test_role_changed__tells_the_member(organization, admin, member_with, mailoutbox):
    member = member_with(Role.MEMBER)

    services.change_role(
        actor=admin, organization=organization, member=member, role=Role.VIEWER
    )
    drain()

    [mail] = mailoutbox
    assert mail.to == [member.email]
    assert "from member to viewer" in mail.body


def test_removed__tells_the_former_member(organization, admin, member_with, mailoutbox):
    member = member_with(Role.MEMBER)

    services.remove_member(actor=admin, organization=organization, member=member)
    drain()

    [mail] = mailoutbox
    assert mail.to == [member.email]
    assert "no longer a member of Acme" in mail.subject


def test_removed__a_deleted_user_gets_nothing(
    organization, admin, member_with, mailoutbox
):
    member = member_with(Role.MEMBER)
    services.remove_member(actor=admin, organization=organization, member=member)
    member.delete()

    assert drain().completed == 1
    assert mailoutbox == []


def test_project_created__tells_the_other_members(
    organization, admin, member_with, mailoutbox
):
    viewer = member_with(Role.VIEWER)

    services.create_project(actor=admin, organization=organization, name="Apollo")
    drain()

    # The creator gets the welcome digest instead (tests/organizations/test_tasks.py).
    [mail] = [mail for mail in mailoutbox if mail.to != [admin.email]]
    assert mail.to == [viewer.email]
    assert mail.subject == "New project in Acme: Apollo"


@pytest.mark.parametrize(
    ("event_type", "payload"),
    [
        ("user.invited", {}),
        ("user.invited", {"invitation_id": "7"}),
        ("organization.created", {"organization_id": 1}),
        ("membership.created", ["not", "an", "object"]),
        ("membership.role_changed", {"organization_id": 1, "user_id": 2}),
        ("membership.removed", {"organization_id": True, "user_id": 2}),
        ("project.created", {"project_id": None, "actor_id": 1}),
    ],
)
def test_malformed_payload__fails_at_once_with_a_clear_message(event_type, payload):
    event = publish(event_type, payload)

    drain()

    event.refresh_from_db()
    assert event.status == Status.FAILED
    assert event.attempts == 1
    assert f"the payload of {event_type}" in event.last_error


def test_smtp_error__is_retried(organization, admin, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise smtplib.SMTPServerDisconnected("Connection unexpectedly closed")

    monkeypatch.setattr("django.core.mail.EmailMessage.send", refuse)
    services.create_project(actor=admin, organization=organization, name="Apollo")
    MembershipFactory.create(organization=organization)

    result = drain()

    assert result.retried == 2  # the announcement and the welcome digest task
    event = only_event("project.created")
    assert event.status == Status.PENDING
    assert "SMTPServerDisconnected" in event.last_error
