"""Who may do what, checked where it counts: at accept, and under the lock.

An invitation carries its sender's right to invite; it must not outlive it.
A role checked before the organization is locked may have changed by the
time the service writes, so the services read it again under the lock.
"""

import time
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from organizations import services
from organizations.errors import Forbidden, NotFound
from organizations.models import AuditEntry, Invitation, Membership, Role
from organizations.tokens import make_invitation_token
from tests.factories import InvitationFactory, MembershipFactory, UserFactory
from tests.organizations.conftest import Api
from tests.outbox.sessions import (
    InThread,
    backend_pid,
    open_transaction,
    waiting_for_a_lock,
)
from users.models import User

PASSWORD = "a-sturdy-passphrase-42"


@pytest.fixture
def second_admin(organization) -> User:
    return MembershipFactory.create(organization=organization, role=Role.ADMIN).user


def accept(api_as, invitation: Invitation, password: str = PASSWORD):
    return api_as().post(
        "invitations/accept",
        {"token": make_invitation_token(invitation), "password": password},
    )


def invite_myself(api_as, admin) -> Invitation:
    """The attack's first step: an admin invites another address of theirs."""
    response = api_as(admin).post(
        "organizations/acme/invitations",
        {"email": "my-other-address@example.com", "role": "admin"},
    )
    assert response.status_code == 201
    return Invitation.objects.get(pk=response.json_body["id"])


# --- invitations do not outlive their sender's rights -----------------------


@pytest.mark.django_db
def test_removed_admin__cannot_come_back_through_their_own_invitation(
    api_as, admin, second_admin
):
    invitation = invite_myself(api_as, admin)
    removed = api_as(second_admin).delete(f"organizations/acme/members/{admin.pk}")

    response = accept(api_as, invitation)

    assert removed.status_code == 204
    assert response.status_code == 400
    assert response.json_body["fields"] == {"token": ["This invitation was revoked."]}
    assert not Membership.objects.filter(
        user__email="my-other-address@example.com"
    ).exists()
    revoked = AuditEntry.objects.get(action="invitation.revoked")
    assert (revoked.actor, revoked.subject_id, revoked.metadata) == (
        second_admin,
        str(invitation.pk),
        {"reason": "inviter removed"},
    )


@pytest.mark.django_db
def test_demoted_admin__their_open_invitations_are_revoked(api_as, admin, second_admin):
    invitation = invite_myself(api_as, admin)
    other = InvitationFactory.create(
        organization=invitation.organization, invited_by=second_admin
    )

    api_as(second_admin).patch(
        f"organizations/acme/members/{admin.pk}", {"role": "member"}
    )

    invitation.refresh_from_db()
    other.refresh_from_db()
    assert invitation.revoked_at is not None
    assert other.revoked_at is None  # another admin's invitation stands
    assert accept(api_as, invitation).status_code == 400


@pytest.mark.django_db
@pytest.mark.parametrize(
    "lose_the_right",
    [
        pytest.param(
            lambda m: Membership.objects.filter(pk=m.pk).update(role=Role.MEMBER),
            id="demoted behind the services' back",
        ),
        pytest.param(
            lambda m: Membership.objects.filter(pk=m.pk).delete(), id="membership gone"
        ),
        pytest.param(
            lambda m: User.objects.filter(pk=m.user_id).update(is_active=False),
            id="account deactivated",
        ),
        pytest.param(
            lambda m: User.objects.filter(pk=m.user_id).delete(), id="account deleted"
        ),
    ],
)
def test_accept__refuses_an_invitation_whose_sender_may_no_longer_invite(
    api_as, organization, lose_the_right
):
    # An admin as sender, then the right lost without remove_member() or
    # change_role() (the Django admin, a script): accept checks the sender.
    sender = MembershipFactory.create(organization=organization, role=Role.ADMIN)
    MembershipFactory.create(organization=organization, role=Role.ADMIN)
    invitation = InvitationFactory.create(
        organization=organization, invited_by=sender.user
    )
    lose_the_right(sender)

    response = accept(api_as, invitation)

    assert response.status_code == 400
    assert response.json_body["fields"] == {
        "token": ["This invitation is no longer valid."]
    }
    assert not Membership.objects.filter(user__email=invitation.email).exists()
    assert not User.objects.filter(email=invitation.email).exists()


# --- admins list and revoke invitations -------------------------------------


@pytest.mark.django_db
def test_invitations__admins_list_the_open_ones_newest_first(
    api_as, admin, organization
):
    older = InvitationFactory.create(organization=organization, invited_by=admin)
    newer = InvitationFactory.create(organization=organization, invited_by=admin)
    InvitationFactory.create(organization=organization, revoked=True)
    InvitationFactory.create(organization=organization, accepted=True)
    expired = InvitationFactory.create(organization=organization)
    Invitation.objects.filter(pk=expired.pk).update(
        created_at=timezone.now() - timedelta(days=8),
        expires_at=timezone.now() - timedelta(days=1),
    )
    demoted = InvitationFactory.create(organization=organization)
    Membership.objects.filter(user=demoted.invited_by).update(role=Role.MEMBER)
    InvitationFactory.create()  # another organization's

    response = api_as(admin).get("organizations/acme/invitations")

    assert response.status_code == 200
    assert [i["id"] for i in response.json_body["invitations"]] == [
        newer.pk,
        older.pk,
    ]
    assert response.json_body["invitations"][0] == {
        "id": newer.pk,
        "email": newer.email,
        "role": "member",
        "invited_by": admin.email,
        "created_at": newer.created_at.isoformat(),
        "expires_at": newer.expires_at.isoformat(),
    }


@pytest.mark.django_db
def test_invitations__an_admin_revokes_one_and_its_link_stops_working(
    api_as, admin, organization
):
    invitation = InvitationFactory.create(organization=organization)

    response = api_as(admin).delete(f"organizations/acme/invitations/{invitation.pk}")
    again = api_as(admin).delete(f"organizations/acme/invitations/{invitation.pk}")

    assert (response.status_code, again.status_code) == (204, 204)
    assert accept(api_as, invitation).status_code == 400
    [entry] = AuditEntry.objects.filter(action="invitation.revoked")
    assert (entry.actor, entry.metadata) == (admin, {"reason": "revoked"})


@pytest.mark.django_db
def test_invitations__an_accepted_one_cannot_be_revoked(api_as, admin, organization):
    invitation = InvitationFactory.create(organization=organization, accepted=True)

    response = api_as(admin).delete(f"organizations/acme/invitations/{invitation.pk}")

    assert response.status_code == 409
    invitation.refresh_from_db()
    assert invitation.revoked_at is None


@pytest.mark.django_db
@pytest.mark.parametrize("method", ["get", "delete"])
def test_invitations__others_get_404_members_403(api_as, admin, organization, method):
    invitation = InvitationFactory.create(organization=organization)
    elsewhere = InvitationFactory.create()
    member = MembershipFactory.create(organization=organization).user
    path = "organizations/acme/invitations"
    if method == "delete":
        path += f"/{invitation.pk}"

    stranger = getattr(api_as(UserFactory.create()), method)(path)
    mere_member = getattr(api_as(member), method)(path)
    other_organization = api_as(admin).delete(
        f"organizations/acme/invitations/{elsewhere.pk}"
    )

    assert stranger.status_code == 404
    assert mere_member.status_code == 403
    assert other_organization.status_code == 404
    assert other_organization.json_body == {"error": "No such invitation."}
    assert Invitation.objects.filter(revoked_at__isnull=False).count() == 0


# --- deactivated accounts ---------------------------------------------------


@pytest.mark.django_db
def test_accept__a_deactivated_account_is_refused(api_as, organization):
    user = UserFactory.create(email="gone@example.com", is_active=False)
    user.set_password(PASSWORD)
    user.save()
    invitation = InvitationFactory.create(
        organization=organization, email="gone@example.com"
    )

    response = accept(api_as, invitation)

    assert response.status_code == 403
    assert response.json_body == {"error": "This account is deactivated."}
    assert not Membership.objects.filter(user=user).exists()
    invitation.refresh_from_db()
    assert invitation.accepted_at is None


# --- the role is read again under the organization's lock -------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("call", "error"),
    [
        (
            lambda actor, org, target, invitation: services.remove_member(
                actor=actor, organization=org, member=target
            ),
            Forbidden,
        ),
        (
            lambda actor, org, target, invitation: services.change_role(
                actor=actor, organization=org, member=target, role=Role.ADMIN
            ),
            Forbidden,
        ),
        (
            lambda actor, org, target, invitation: services.invite_member(
                actor=actor, organization=org, email="x@example.com", role="member"
            ),
            Forbidden,
        ),
        (
            lambda actor, org, target, invitation: services.revoke_invitation(
                actor=actor,
                organization=org,
                invitation_id=invitation.pk,
            ),
            Forbidden,
        ),
    ],
    ids=["remove_member", "change_role", "invite_member", "revoke_invitation"],
)
def test_services__refuse_an_actor_whose_role_changed_since_the_view_checked(
    organization, call, error
):
    actor = MembershipFactory.create(organization=organization, role=Role.VIEWER)
    target = MembershipFactory.create(organization=organization).user
    invitation = InvitationFactory.create(organization=organization)
    members = Membership.objects.count()

    with pytest.raises(error):
        call(actor.user, organization, target, invitation)

    assert Membership.objects.get(user=target).role == Role.MEMBER
    assert Membership.objects.count() == members
    invitation.refresh_from_db()
    assert invitation.revoked_at is None
    assert not Invitation.objects.filter(email="x@example.com").exists()


@pytest.mark.django_db
def test_create_project__refuses_an_actor_no_longer_a_member(organization):
    outsider = UserFactory.create()

    with pytest.raises(NotFound):
        services.create_project(actor=outsider, organization=organization, name="X")

    assert not organization.projects.exists()


#: What an admin starts while being demoted: (method, path, body, and what
#: must stand afterwards).
WHILE_DEMOTED = {
    "remove a member": (
        "delete",
        "members/{target}",
        None,
        lambda w: Membership.objects.filter(user=w["target"]).exists(),
    ),
    "change a role": (
        "patch",
        "members/{target}",
        {"role": "admin"},
        lambda w: Membership.objects.get(user=w["target"]).role == Role.MEMBER,
    ),
    "invite": (
        "post",
        "invitations",
        {"email": "late@example.com", "role": "admin"},
        lambda w: not Invitation.objects.filter(email="late@example.com").exists(),
    ),
    "revoke an invitation": (
        "delete",
        "invitations/{invitation}",
        None,
        lambda w: Invitation.objects.get(pk=w["invitation"].pk).revoked_at is None,
    ),
    "create a project": (
        "post",
        "projects",
        {"name": "Late"},
        lambda w: not w["organization"].projects.exists(),
    ),
}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("action", WHILE_DEMOTED.values(), ids=WHILE_DEMOTED.keys())
def test_an_admin_demoted_while_their_request_waits__is_refused(organization, action):
    # The request passes the view's role check while the demotion is not
    # yet committed, then waits for the organization's lock the demotion
    # holds; once it gets it, the role it reads is the new one.
    method, path, body, stands = action
    actor = MembershipFactory.create(organization=organization, role=Role.ADMIN)
    other_admin = MembershipFactory.create(organization=organization, role=Role.ADMIN)
    world = {
        "organization": organization,
        "target": MembershipFactory.create(organization=organization).user,
        "invitation": InvitationFactory.create(
            organization=organization, invited_by=other_admin.user
        ),
    }
    client = Client()
    client.force_login(actor.user)
    api = Api(client)
    backends: list[int] = []
    url = "organizations/acme/" + path.format(
        target=world["target"].pk, invitation=world["invitation"].pk
    )

    def request() -> object:
        backends.append(backend_pid())
        return api.call(method, url, body)

    def demote() -> None:
        services.change_role(
            actor=other_admin.user,
            organization=organization,
            member=actor.user,
            role=Role.VIEWER,
        )

    with open_transaction(demote):
        waiting = InThread(request)
        deadline = time.monotonic() + 10
        while not (backends and waiting_for_a_lock(backends[0])):
            assert time.monotonic() < deadline, "the request never waited"
            assert waiting.thread.is_alive(), "the request did not wait"
            time.sleep(0.01)

    response = waiting.join()
    assert response.status_code == 403, response.json_body
    assert stands(world)
