"""Every row of the JSON API: success, wrong role, other organization, bad input."""

from typing import Any

import pytest
from django.conf import settings
from django.core.cache import caches
from django.db.models import Model
from django.test import Client

from organizations.models import (
    AuditEntry,
    Invitation,
    Membership,
    Organization,
    Project,
    Role,
)
from outbox.models import OutboxEvent
from tests.factories import ProjectFactory

pytestmark = pytest.mark.django_db

#: What a refused request must leave exactly as it was.
GUARDED: tuple[type[Model], ...] = (
    Organization,
    Invitation,
    Membership,
    Project,
    AuditEntry,
    OutboxEvent,
)

NOT_FOUND = {"error": "No such organization."}


def events(event_type: str) -> list[OutboxEvent]:
    return list(OutboxEvent.objects.filter(event_type=event_type))


def rows() -> dict[str, list[dict[str, Any]]]:
    """Return every row of the guarded models, to compare before and after."""
    return {
        model.__name__: list(model._default_manager.order_by("pk").values())
        for model in GUARDED
    }


# --- authentication -------------------------------------------------------


def test_login__with_email_and_password_starts_a_session(api_as, stranger_user):
    api = api_as()

    response = api.post(
        "auth/login",
        {
            "email": stranger_user.email.upper(),
            "password": "correct horse battery staple",
        },
    )

    assert response.status_code == 200
    assert response.json_body == {"id": stranger_user.pk, "email": stranger_user.email}
    assert api.get("organizations").status_code == 200


def test_login__wrong_password_is_400_without_saying_which(api_as, stranger_user):
    response = api_as().post(
        "auth/login", {"email": stranger_user.email, "password": "wrong"}
    )

    assert response.status_code == 400
    assert response.json_body == {"error": "The email or password is wrong."}


def test_login__bad_input_names_each_field(api_as):
    response = api_as().post("auth/login", {"email": "not-an-email"})

    assert response.status_code == 400
    assert set(response.json_body["fields"]) == {"email", "password"}


def test_login__body_that_is_not_json_is_400(api_as):
    response = api_as().client.post(
        "/api/auth/login", data="{", content_type="application/json"
    )

    assert response.status_code == 400
    assert response.json()["error"] == "The body is not valid JSON."


def test_logout__ends_the_session(api_as, stranger_user):
    api = api_as(stranger_user)

    assert api.post("auth/logout").status_code == 204
    assert api.get("organizations").status_code == 401


def test_csrf__is_enforced_for_browsers(stranger_user):
    browser = Client(enforce_csrf_checks=True)
    body = {"email": stranger_user.email, "password": "correct horse battery staple"}

    refused = browser.post("/api/auth/login", body, content_type="application/json")
    token = browser.get("/api/auth/csrf").json()["csrf_token"]
    accepted = browser.post(
        "/api/auth/login", body, content_type="application/json", HTTP_X_CSRFTOKEN=token
    )

    assert refused.status_code == 403
    assert accepted.status_code == 200


def test_every_endpoint__needs_a_login(api_as, organization):
    api = api_as()

    for method, path in [
        ("get", "organizations"),
        ("post", "organizations"),
        ("post", "organizations/acme/invitations"),
        ("get", "organizations/acme/members"),
        ("patch", "organizations/acme/members/1"),
        ("delete", "organizations/acme/members/1"),
        ("get", "organizations/acme/projects"),
        ("post", "organizations/acme/projects"),
    ]:
        response = api.call(method, path, {} if method != "get" else None)
        assert response.status_code == 401, (method, path)


# --- organizations --------------------------------------------------------


def test_list_organizations__only_the_callers(api_as, admin, outsider):
    response = api_as(admin).get("organizations")

    assert response.status_code == 200
    assert response.json_body == {
        "organizations": [{"name": "Acme", "slug": "acme", "role": "admin"}]
    }


def test_create_organization__writes_admin_membership_audit_and_event(
    api_as, stranger_user
):
    response = api_as(stranger_user).post(
        "organizations", {"name": "Globex", "slug": "globex"}
    )

    assert response.status_code == 201
    assert response.json_body == {"name": "Globex", "slug": "globex", "role": "admin"}
    membership = Membership.objects.get(user=stranger_user)
    assert membership.role == Role.ADMIN
    assert AuditEntry.objects.filter(action="organization.created").count() == 1
    [event] = events("organization.created")
    organization_id = membership.organization_id
    assert event.payload == {
        "organization_id": organization_id,
        "actor_id": stranger_user.pk,
    }
    assert event.key == f"org:{organization_id}"


def test_create_organization__taken_slug_is_a_conflict(api_as, organization, admin):
    api = api_as(admin)
    before = rows()

    response = api.post("organizations", {"name": "Other", "slug": "acme"})

    assert response.status_code == 409
    assert response.json_body["fields"] == {"slug": ["This slug is taken."]}
    assert rows() == before


def test_create_organization__bad_input_names_each_field(api_as, stranger_user):
    response = api_as(stranger_user).post(
        "organizations", {"name": "", "slug": "not a slug"}
    )

    assert response.status_code == 400
    assert set(response.json_body["fields"]) == {"name", "slug"}


# --- invitations ----------------------------------------------------------


def test_invite__writes_invitation_audit_and_one_event(api_as, organization, admin):
    response = api_as(admin).post(
        "organizations/acme/invitations", {"email": "New@Example.com", "role": "member"}
    )

    assert response.status_code == 201
    invitation = Invitation.objects.get()
    assert response.json_body["id"] == invitation.pk
    assert invitation.email == "New@example.com"
    assert invitation.invited_by == admin
    assert AuditEntry.objects.filter(action="invitation.created").count() == 1
    [event] = events("user.invited")
    assert event.payload == {"invitation_id": invitation.pk}
    assert event.idempotency_key == f"user.invited:{invitation.pk}"
    assert "example.com" not in str(event.payload)


@pytest.mark.parametrize("role", [Role.MEMBER, Role.VIEWER])
def test_invite__needs_an_admin(api_as, admin, member_with, role):
    api = api_as(member_with(role))
    before = rows()

    response = api.post(
        "organizations/acme/invitations", {"email": "x@example.com", "role": "member"}
    )

    assert response.status_code == 403
    assert rows() == before


def test_invite__another_organization_is_not_found(api_as, admin, outsider):
    api = api_as(outsider)
    before = rows()

    response = api.post(
        "organizations/acme/invitations", {"email": "x@example.com", "role": "member"}
    )

    assert response.status_code == 404
    assert response.json_body == NOT_FOUND
    assert rows() == before


def test_invite__bad_input_names_each_field(api_as, admin):
    response = api_as(admin).post(
        "organizations/acme/invitations", {"email": "nope", "role": "owner"}
    )

    assert response.status_code == 400
    assert set(response.json_body["fields"]) == {"email", "role"}


def test_invite__an_existing_member_is_a_conflict(api_as, admin, member_with):
    member = member_with(Role.VIEWER)
    api = api_as(admin)
    before = rows()

    response = api.post(
        "organizations/acme/invitations",
        {"email": member.email.upper(), "role": "admin"},
    )

    assert response.status_code == 409
    assert rows() == before


def test_invite__again_revokes_the_open_invitation(api_as, admin):
    api = api_as(admin)
    body = {"email": "twice@example.com", "role": "member"}

    first = api.post("organizations/acme/invitations", body).json_body["id"]
    caches[settings.THROTTLE_CACHE].clear()  # the recipient's cooldown has passed
    second = api.post("organizations/acme/invitations", body).json_body["id"]

    assert Invitation.objects.get(pk=first).revoked_at is not None
    assert Invitation.objects.get(pk=second).revoked_at is None
    assert len(events("user.invited")) == 2


# --- members --------------------------------------------------------------


def test_members__any_member_lists_them(api_as, admin, member_with):
    viewer = member_with(Role.VIEWER)

    response = api_as(viewer).get("organizations/acme/members")

    assert response.status_code == 200
    roles = {row["user_id"]: row["role"] for row in response.json_body["members"]}
    assert roles == {admin.pk: "admin", viewer.pk: "viewer"}


def test_members__another_organizations_members_are_not_listed(api_as, admin, outsider):
    response = api_as(admin).get("organizations/acme/members")

    assert response.status_code == 200
    assert [row["user_id"] for row in response.json_body["members"]] == [admin.pk]


def test_members__another_organization_is_not_found(api_as, admin, outsider):
    api = api_as(outsider)
    before = rows()

    response = api.get("organizations/acme/members")

    assert response.status_code == 404
    assert response.json_body == NOT_FOUND  # no member, and not "forbidden"
    assert rows() == before


def test_members__an_organization_that_does_not_exist_is_not_found(api_as, admin):
    response = api_as(admin).get("organizations/nope/members")

    assert response.status_code == 404
    assert response.json_body == NOT_FOUND


def test_change_role__writes_role_audit_and_event(api_as, admin, member_with):
    member = member_with(Role.MEMBER)

    response = api_as(admin).patch(
        f"organizations/acme/members/{member.pk}", {"role": "viewer"}
    )

    assert response.status_code == 200
    assert response.json_body["role"] == "viewer"
    assert Membership.objects.get(user=member).role == Role.VIEWER
    assert AuditEntry.objects.get(action="membership.role_changed").metadata == {
        "old_role": "member",
        "new_role": "viewer",
    }
    [event] = events("membership.role_changed")
    assert event.payload["user_id"] == member.pk
    assert (event.payload["old_role"], event.payload["new_role"]) == (
        "member",
        "viewer",
    )


@pytest.mark.parametrize("role", [Role.MEMBER, Role.VIEWER])
def test_change_role__needs_an_admin(api_as, admin, member_with, role):
    api = api_as(member_with(role))
    target = member_with(Role.VIEWER)
    before = rows()

    response = api.patch(f"organizations/acme/members/{target.pk}", {"role": "admin"})

    assert response.status_code == 403
    assert rows() == before


def test_change_role__another_organization_is_not_found(
    api_as, admin, member_with, outsider
):
    target = member_with(Role.MEMBER)
    api = api_as(outsider)
    before = rows()

    response = api.patch(f"organizations/acme/members/{target.pk}", {"role": "viewer"})

    assert response.status_code == 404
    assert response.json_body == NOT_FOUND
    assert rows() == before


def test_change_role__someone_outside_the_organization_is_not_found(
    api_as, admin, outsider
):
    api = api_as(admin)
    before = rows()

    response = api.patch(
        f"organizations/acme/members/{outsider.pk}", {"role": "viewer"}
    )

    assert response.status_code == 404
    assert response.json_body == {"error": "No such member."}
    assert rows() == before


def test_change_role__bad_input_names_the_field(api_as, admin, member_with):
    member = member_with(Role.MEMBER)

    response = api_as(admin).patch(
        f"organizations/acme/members/{member.pk}", {"role": "owner"}
    )

    assert response.status_code == 400
    assert set(response.json_body["fields"]) == {"role"}


def test_change_role__the_last_admin_cannot_be_demoted(api_as, admin, member_with):
    member_with(Role.MEMBER)
    api = api_as(admin)
    before = rows()

    response = api.patch(f"organizations/acme/members/{admin.pk}", {"role": "member"})

    assert response.status_code == 409
    assert Membership.objects.get(user=admin).role == Role.ADMIN
    assert rows() == before


def test_change_role__an_admin_may_step_down_when_another_remains(
    api_as, admin, member_with
):
    member_with(Role.ADMIN)

    response = api_as(admin).patch(
        f"organizations/acme/members/{admin.pk}", {"role": "member"}
    )

    assert response.status_code == 200


def test_change_role__to_the_same_role_changes_nothing(api_as, admin, member_with):
    member = member_with(Role.MEMBER)

    response = api_as(admin).patch(
        f"organizations/acme/members/{member.pk}", {"role": "member"}
    )

    assert response.status_code == 200
    assert not events("membership.role_changed")


def test_remove_member__writes_removal_audit_and_event(api_as, admin, member_with):
    member = member_with(Role.MEMBER)

    response = api_as(admin).delete(f"organizations/acme/members/{member.pk}")

    assert response.status_code == 204
    assert not Membership.objects.filter(user=member).exists()
    assert AuditEntry.objects.filter(action="membership.removed").count() == 1
    [event] = events("membership.removed")
    assert event.payload["user_id"] == member.pk


def test_remove_member__the_removed_member_no_longer_sees_the_organization(
    api_as, admin, member_with
):
    member = member_with(Role.MEMBER)
    removed = api_as(member)

    api_as(admin).delete(f"organizations/acme/members/{member.pk}")

    assert removed.get("organizations").json_body == {"organizations": []}
    assert removed.get("organizations/acme/members").status_code == 404
    assert removed.get("organizations/acme/projects").status_code == 404


@pytest.mark.parametrize("role", [Role.MEMBER, Role.VIEWER])
def test_remove_member__needs_an_admin(api_as, admin, member_with, role):
    api = api_as(member_with(role))
    target = member_with(Role.VIEWER)
    before = rows()

    response = api.delete(f"organizations/acme/members/{target.pk}")

    assert response.status_code == 403
    assert rows() == before


def test_remove_member__another_organization_is_not_found(
    api_as, admin, member_with, outsider
):
    target = member_with(Role.MEMBER)
    api = api_as(outsider)
    before = rows()

    response = api.delete(f"organizations/acme/members/{target.pk}")

    assert response.status_code == 404
    assert response.json_body == NOT_FOUND
    assert rows() == before


def test_remove_member__someone_outside_the_organization_is_not_found(
    api_as, admin, outsider
):
    api = api_as(admin)
    before = rows()

    response = api.delete(f"organizations/acme/members/{outsider.pk}")

    assert response.status_code == 404
    assert response.json_body == {"error": "No such member."}
    assert rows() == before


def test_remove_member__the_last_admin_cannot_be_removed(api_as, admin, member_with):
    member_with(Role.MEMBER)
    api = api_as(admin)
    before = rows()

    response = api.delete(f"organizations/acme/members/{admin.pk}")

    assert response.status_code == 409
    assert rows() == before


# --- projects -------------------------------------------------------------


def test_projects__any_member_lists_them(api_as, organization, member_with):
    ProjectFactory.create(organization=organization, name="Apollo")
    ProjectFactory.create(name="Elsewhere")

    response = api_as(member_with(Role.VIEWER)).get("organizations/acme/projects")

    assert response.status_code == 200
    assert [row["name"] for row in response.json_body["projects"]] == ["Apollo"]


def test_projects__a_member_of_another_organization_sees_only_its_own(
    api_as, organization, outsider
):
    ProjectFactory.create(organization=organization, name="Apollo")
    own = outsider.memberships.get().organization
    ProjectFactory.create(organization=own, name="Mercury")

    response = api_as(outsider).get(f"organizations/{own.slug}/projects")

    assert response.status_code == 200
    assert [row["name"] for row in response.json_body["projects"]] == ["Mercury"]


def test_projects__another_organization_is_not_found(
    api_as, organization, admin, outsider
):
    ProjectFactory.create(organization=organization, name="Apollo")

    response = api_as(outsider).get("organizations/acme/projects")

    assert response.status_code == 404
    assert response.json_body == NOT_FOUND


@pytest.mark.parametrize("role", [Role.ADMIN, Role.MEMBER])
def test_create_project__writes_project_audit_and_event(api_as, member_with, role):
    user = member_with(role)

    response = api_as(user).post("organizations/acme/projects", {"name": "Apollo"})

    assert response.status_code == 201
    project = Project.objects.get()
    assert (project.name, project.created_by) == ("Apollo", user)
    assert AuditEntry.objects.filter(action="project.created").count() == 1
    [event] = events("project.created")
    assert event.payload == {"project_id": project.pk, "actor_id": user.pk}


def test_create_project__viewers_read_only(api_as, admin, member_with):
    api = api_as(member_with(Role.VIEWER))
    before = rows()

    response = api.post("organizations/acme/projects", {"name": "Apollo"})

    assert response.status_code == 403
    assert rows() == before


def test_create_project__another_organization_is_not_found(api_as, admin, outsider):
    api = api_as(outsider)
    before = rows()

    response = api.post("organizations/acme/projects", {"name": "Apollo"})

    assert response.status_code == 404
    assert response.json_body == NOT_FOUND
    assert rows() == before


def test_create_project__bad_input_names_the_field(api_as, admin):
    response = api_as(admin).post("organizations/acme/projects", {"name": ""})

    assert response.status_code == 400
    assert set(response.json_body["fields"]) == {"name"}


def test_create_project__a_duplicate_name_is_a_conflict(api_as, organization, admin):
    ProjectFactory.create(organization=organization, name="Apollo")
    api = api_as(admin)
    before = rows()

    response = api.post("organizations/acme/projects", {"name": "apollo"})

    assert response.status_code == 409
    assert rows() == before
