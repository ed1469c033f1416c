"""Accepting an invitation: the token is checked, and a bad one changes nothing."""

import time
from datetime import timedelta

import pytest
from django.core import signing
from django.utils import timezone

from organizations import services
from organizations.models import AuditEntry, Invitation, Membership, Role
from organizations.tokens import make_invitation_token
from outbox.models import OutboxEvent
from tests.factories import InvitationFactory, MembershipFactory, UserFactory
from users.models import User

pytestmark = pytest.mark.django_db

PASSWORD = "a-sturdy-passphrase-42"


@pytest.fixture
def invitation(organization):
    return InvitationFactory.create(
        organization=organization, email="newcomer@example.com", role=Role.VIEWER
    )


def accept(api_as, token: str, password: str = PASSWORD):
    return api_as().post("invitations/accept", {"token": token, "password": password})


def nothing_changed() -> bool:
    return not (
        Membership.objects.filter(user__email="newcomer@example.com").exists()
        or OutboxEvent.objects.filter(event_type="membership.created").exists()
        or AuditEntry.objects.filter(action="invitation.accepted").exists()
    )


def test_accept__creates_the_user_membership_audit_and_event(api_as, invitation):
    response = accept(api_as, make_invitation_token(invitation))

    assert response.status_code == 201
    assert response.json_body == {"name": "Acme", "slug": "acme", "role": "viewer"}
    user = User.objects.get(email="newcomer@example.com")
    assert user.check_password(PASSWORD)
    membership = Membership.objects.get(user=user)
    assert membership.role == Role.VIEWER
    invitation.refresh_from_db()
    assert invitation.accepted_at is not None
    assert AuditEntry.objects.get(action="invitation.accepted").actor == user
    [event] = OutboxEvent.objects.filter(event_type="membership.created")
    assert event.payload == {
        "membership_id": membership.pk,
        "organization_id": invitation.organization_id,
    }


def test_accept__logs_the_new_member_in(api_as, invitation):
    api = api_as()

    api.post(
        "invitations/accept",
        {"token": make_invitation_token(invitation), "password": PASSWORD},
    )

    assert api.get("organizations/acme/members").status_code == 200


def test_accept__an_existing_account_must_give_its_password(api_as, invitation):
    UserFactory.create(email="Newcomer@example.com", password=PASSWORD)
    token = make_invitation_token(invitation)

    wrong = accept(api_as, token, password="not-the-password")
    right = accept(api_as, token)

    assert wrong.status_code == 400
    assert "password" in wrong.json_body["fields"]
    assert right.status_code == 201
    assert User.objects.filter(email__iexact="newcomer@example.com").count() == 1


def test_accept__a_weak_password_for_a_new_account_is_400(api_as, invitation):
    response = accept(api_as, make_invitation_token(invitation), password="123")

    assert response.status_code == 400
    assert "password" in response.json_body["fields"]
    assert nothing_changed()


def test_accept__a_used_token_is_400(api_as, invitation):
    token = make_invitation_token(invitation)
    assert accept(api_as, token).status_code == 201

    again = accept(api_as, token)

    assert again.status_code == 400
    assert again.json_body["fields"] == {"token": ["This invitation was already used."]}
    assert Membership.objects.filter(user__email="newcomer@example.com").count() == 1


def test_accept__a_used_link_stays_used_after_its_member_was_removed(
    api_as, invitation, organization, admin
):
    token = make_invitation_token(invitation)
    assert accept(api_as, token).status_code == 201
    newcomer = User.objects.get(email="newcomer@example.com")
    services.remove_member(actor=admin, organization=organization, member=newcomer)

    again = accept(api_as, token)

    assert again.status_code == 400
    assert again.json_body["fields"] == {"token": ["This invitation was already used."]}
    assert not Membership.objects.filter(user=newcomer).exists()


def test_accept__a_revoked_invitation_is_400(api_as, invitation):
    invitation.revoked_at = timezone.now()
    invitation.save(update_fields=["revoked_at"])

    response = accept(api_as, make_invitation_token(invitation))

    assert response.status_code == 400
    assert response.json_body["fields"] == {"token": ["This invitation was revoked."]}
    assert nothing_changed()


def test_accept__an_expired_invitation_is_400(api_as, invitation):
    Invitation.objects.filter(pk=invitation.pk).update(
        created_at=timezone.now() - timedelta(days=9),
        expires_at=timezone.now() - timedelta(days=2),
    )

    response = accept(api_as, make_invitation_token(invitation))

    assert response.status_code == 400
    assert response.json_body["fields"] == {"token": ["This invitation has expired."]}
    assert nothing_changed()


def test_accept__an_old_link_is_400_even_if_the_row_says_otherwise(
    api_as, invitation, settings, monkeypatch
):
    settings.INVITATION_VALID_DAYS = 1
    three_days_ago = time.time() - 3 * 86400
    with monkeypatch.context() as patched:
        patched.setattr(time, "time", lambda: three_days_ago)
        token = make_invitation_token(invitation)

    response = accept(api_as, token)

    assert response.status_code == 400
    assert response.json_body["fields"] == {
        "token": ["This invitation link has expired."]
    }
    assert nothing_changed()


@pytest.mark.parametrize(
    "tamper",
    [
        lambda token: token[:-1] + ("A" if token[-1] != "A" else "B"),
        lambda token: "x" + token,
        lambda token: signing.dumps({"invitation": 1, "email": "x"}, salt="other"),
        lambda token: "",
    ],
)
def test_accept__a_tampered_token_is_400(api_as, invitation, tamper):
    response = accept(api_as, tamper(make_invitation_token(invitation)))

    assert response.status_code == 400
    assert "token" in response.json_body["fields"]
    assert nothing_changed()


def test_accept__a_token_for_another_address_is_400(api_as, invitation, organization):
    other = InvitationFactory.create(
        organization=organization, email="other@example.com"
    )
    forged = signing.dumps(
        {"invitation": other.pk, "email": "newcomer@example.com"},
        salt="organizations.invitation",
    )

    response = accept(api_as, forged)

    assert response.status_code == 400
    assert nothing_changed()


def test_accept__someone_already_a_member_is_a_conflict(
    api_as, invitation, organization
):
    user = UserFactory.create(email="newcomer@example.com", password=PASSWORD)
    MembershipFactory.create(user=user, organization=organization)

    response = accept(api_as, make_invitation_token(invitation))

    assert response.status_code == 409
    invitation.refresh_from_db()
    assert invitation.accepted_at is None
