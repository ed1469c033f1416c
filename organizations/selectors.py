"""Reads of the organization domain, scoped to what the caller may see."""

from django.db.models import Exists, OuterRef, QuerySet
from django.utils import timezone

from organizations.errors import Forbidden, NotFound
from organizations.models import Invitation, Membership, Project, Role
from users.models import User

ADMIN = (Role.ADMIN,)
WRITERS = (Role.ADMIN, Role.MEMBER)


def memberships_of(user: User) -> QuerySet[Membership]:
    """Return the user's memberships with their organizations."""
    return (
        Membership.objects.filter(user=user)
        .select_related("organization")
        .order_by("organization__name")
    )


def membership_in(user: User, slug: str, *, roles: tuple[str, ...] = ()) -> Membership:
    """Return user's membership of the organization, checking the role.

    An organization the user does not belong to is "not found", exactly like
    one that does not exist, so nobody learns which slugs are taken.
    """
    membership = (
        Membership.objects.filter(user=user, organization__slug=slug)
        .select_related("organization")
        .first()
    )
    check_role(membership.role if membership else None, roles)
    assert membership is not None  # noqa: S101 - check_role refused None
    return membership


def check_role(role: str | None, roles: tuple[str, ...] = ()) -> None:
    """Refuse a caller who is no member (404) or, given roles, lacks them (403)."""
    if role is None:
        raise NotFound("No such organization.")
    if roles and role not in roles:
        raise Forbidden(f"This needs the role {' or '.join(roles)}.")


def members_of(membership: Membership) -> QuerySet[Membership]:
    return (
        Membership.objects.filter(organization=membership.organization)
        .select_related("user")
        .order_by("user__email")
    )


def projects_of(membership: Membership) -> QuerySet[Project]:
    return Project.objects.filter(organization=membership.organization).order_by("name")


def open_invitations_of(membership: Membership) -> QuerySet[Invitation]:
    """The organization's invitations that can still be accepted, newest first:
    open, unexpired, and sent by someone who is still an active admin."""
    sender_is_admin = Membership.objects.filter(
        organization=membership.organization,
        user=OuterRef("invited_by"),
        role=Role.ADMIN,
        user__is_active=True,
    )
    return (
        Invitation.objects.filter(
            Exists(sender_is_admin),
            organization=membership.organization,
            accepted_at__isnull=True,
            revoked_at__isnull=True,
            expires_at__gt=timezone.now(),
        )
        .select_related("invited_by")
        .order_by("-created_at", "-id")
    )


def member(membership: Membership, user_id: int) -> User:
    """Return a member of the caller's organization, or raise NotFound."""
    found = User.objects.filter(
        pk=user_id, memberships__organization=membership.organization
    ).first()
    if found is None:
        raise NotFound("No such member.")
    return found
