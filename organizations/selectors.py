"""Reads of the organization domain, scoped to what the caller may see."""

from django.db.models import QuerySet

from organizations.errors import DomainError
from organizations.models import Membership, Project, Role
from users.models import User


class NotFound(DomainError):  # noqa: N818 - reads as the HTTP status it becomes
    """Nothing the caller may see has this name (HTTP 404)."""

    status = 404


class Forbidden(DomainError):  # noqa: N818 - reads as the HTTP status it becomes
    """The caller's role does not allow this (HTTP 403)."""

    status = 403


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
    if membership is None:
        raise NotFound("No such organization.")
    if roles and membership.role not in roles:
        raise Forbidden(f"This needs the role {' or '.join(roles)}.")
    return membership


def members_of(membership: Membership) -> QuerySet[Membership]:
    return (
        Membership.objects.filter(organization=membership.organization)
        .select_related("user")
        .order_by("user__email")
    )


def projects_of(membership: Membership) -> QuerySet[Project]:
    return Project.objects.filter(organization=membership.organization).order_by("name")


def member(membership: Membership, user_id: int) -> User:
    """Return a member of the caller's organization, or raise NotFound."""
    found = User.objects.filter(
        pk=user_id, memberships__organization=membership.organization
    ).first()
    if found is None:
        raise NotFound("No such member.")
    return found


ADMIN = (Role.ADMIN,)
WRITERS = (Role.ADMIN, Role.MEMBER)
