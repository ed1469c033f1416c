"""The JSON API: parse, authorise, call a service, answer.

Every view that names an organization goes through selectors.membership_in,
which answers 404 for an organization the caller does not belong to and 403
for a role that may not do this (the services check again, under a lock).
Sending invitations and accepting them are rate limited (config/throttle.py).
"""

from django.contrib.auth import login
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.debug import sensitive_post_parameters, sensitive_variables

from config import throttle
from config.api import handle_errors, json_api, methods, parse
from organizations import selectors, services
from organizations.errors import WrongPassword
from organizations.forms import (
    AcceptInvitationForm,
    InvitationForm,
    OrganizationForm,
    ProjectForm,
    RoleForm,
)
from organizations.models import Invitation, Membership, Project
from organizations.tokens import read_invitation_token
from users.models import User


@methods("GET", "POST")
@json_api
def organizations(request: HttpRequest) -> HttpResponse:
    """List the caller's organizations, or create one with the caller as admin."""
    user = _user(request)
    if request.method in ("GET", "HEAD"):
        return JsonResponse(
            {
                "organizations": [
                    _organization(m) for m in selectors.memberships_of(user)
                ]
            }
        )
    data = parse(request, OrganizationForm)
    organization = services.create_organization(
        actor=user, name=data["name"], slug=data["slug"]
    )
    membership = selectors.membership_in(user, organization.slug)
    return JsonResponse(_organization(membership), status=201)


@methods("GET", "POST")
@json_api
def invitations(request: HttpRequest, slug: str) -> HttpResponse:
    """List the open invitations, or invite someone (admins only)."""
    user = _user(request)
    membership = selectors.membership_in(user, slug, roles=selectors.ADMIN)
    organization = membership.organization
    if request.method in ("GET", "HEAD"):
        return JsonResponse(
            {
                "invitations": [
                    _invitation(i) for i in selectors.open_invitations_of(membership)
                ]
            }
        )
    data = parse(request, InvitationForm)
    throttle.hit(throttle.INVITATIONS_PER_ACTOR, str(user.pk))
    throttle.hit(throttle.INVITATIONS_PER_ORGANIZATION, str(organization.pk))
    email = User.objects.normalize_email(data["email"])
    throttle.cooldown(
        throttle.INVITATION_COOLDOWN_PER_RECIPIENT,
        f"{organization.pk}:{throttle.folded(email)}",
    )
    invitation = services.invite_member(
        actor=user, organization=organization, email=email, role=data["role"]
    )
    return JsonResponse(_invitation(invitation), status=201)


@methods("DELETE")
@json_api
def invitation(request: HttpRequest, slug: str, invitation_id: int) -> HttpResponse:
    """Revoke an invitation (admins only); its link stops working."""
    user = _user(request)
    membership = selectors.membership_in(user, slug, roles=selectors.ADMIN)
    services.revoke_invitation(
        actor=user, organization=membership.organization, invitation_id=invitation_id
    )
    return HttpResponse(status=204)


@sensitive_post_parameters("password", "token")
@sensitive_variables("data")
@methods("POST")
@handle_errors
def accept_invitation(request: HttpRequest) -> HttpResponse:
    """Join with an invitation link's token; the account is created if new.

    Wrong passwords of an existing account count against the same limit as
    failed logins, so accepting is no way round it.
    """
    throttle.hit(throttle.ACCEPT_PER_CLIENT, throttle.client(request))
    data = parse(request, AcceptInvitationForm)
    _, email = read_invitation_token(
        data["token"], max_age=services.invitation_lifetime()
    )
    throttle.check_password_failures(email)
    try:
        membership = services.accept_invitation(
            token=data["token"], password=data["password"]
        )
    except WrongPassword:
        throttle.record_password_failure(email)
        raise
    login(request, membership.user, backend="config.auth.RateLimitedModelBackend")
    return JsonResponse(_organization(membership), status=201)


@methods("GET")
@json_api
def members(request: HttpRequest, slug: str) -> HttpResponse:
    """List the members of an organization the caller belongs to."""
    membership = selectors.membership_in(_user(request), slug)
    return JsonResponse(
        {"members": [_member(m) for m in selectors.members_of(membership)]}
    )


@methods("PATCH", "DELETE")
@json_api
def member(request: HttpRequest, slug: str, user_id: int) -> HttpResponse:
    """Change a member's role, or remove them (admins only)."""
    user = _user(request)
    membership = selectors.membership_in(user, slug, roles=selectors.ADMIN)
    target = selectors.member(membership, user_id)
    if request.method == "DELETE":
        services.remove_member(
            actor=user, organization=membership.organization, member=target
        )
        return HttpResponse(status=204)
    data = parse(request, RoleForm)
    changed = services.change_role(
        actor=user,
        organization=membership.organization,
        member=target,
        role=data["role"],
    )
    return JsonResponse(_member(changed))


@methods("GET", "POST")
@json_api
def projects(request: HttpRequest, slug: str) -> HttpResponse:
    """List the organization's projects, or create one (not viewers)."""
    user = _user(request)
    if request.method in ("GET", "HEAD"):
        membership = selectors.membership_in(user, slug)
        return JsonResponse(
            {"projects": [_project(p) for p in selectors.projects_of(membership)]}
        )
    membership = selectors.membership_in(user, slug, roles=selectors.WRITERS)
    data = parse(request, ProjectForm)
    project = services.create_project(
        actor=user, organization=membership.organization, name=data["name"]
    )
    return JsonResponse(_project(project), status=201)


def _user(request: HttpRequest) -> User:
    user = request.user
    assert isinstance(user, User)  # noqa: S101 - json_api let only users through
    return user


def _organization(membership: Membership) -> dict[str, str]:
    organization = membership.organization
    return {
        "name": organization.name,
        "slug": organization.slug,
        "role": membership.role,
    }


def _member(membership: Membership) -> dict[str, object]:
    return {
        "user_id": membership.user_id,
        "email": membership.user.email,
        "full_name": membership.user.full_name,
        "role": membership.role,
    }


def _invitation(invitation: Invitation) -> dict[str, object]:
    inviter = invitation.invited_by
    return {
        "id": invitation.pk,
        "email": invitation.email,
        "role": invitation.role,
        "invited_by": inviter.email if inviter is not None else None,
        "created_at": invitation.created_at.isoformat(),
        "expires_at": invitation.expires_at.isoformat(),
    }


def _project(project: Project) -> dict[str, object]:
    return {
        "id": project.pk,
        "name": project.name,
        "created_at": project.created_at.isoformat(),
    }
