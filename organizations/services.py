"""Writes to the organization domain: each in one transaction with its event.

Every service changes its rows, records an audit entry and publishes the
event that tells the outside world, all in one transaction.atomic(): either
all of it commits or none of it does. Events of one organization share the
key org:<id>, so the worker handles them in order. Payloads carry ids, never
personal data; handlers load what they need.

Views check who may do what before they parse a body; each service that
changes members, invitations or projects checks it again, after it has
locked the organization, because a role can change between the two (a
demoted or removed admin must not finish an invitation or a removal begun a
moment before). Membership changes lock the same row, so once it is held the
actor's role stays as read until the commit.
"""

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Value
from django.db.models.functions import Lower
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables

from organizations.errors import (
    Conflict,
    DomainError,
    Forbidden,
    InvalidToken,
    NotFound,
    WrongPassword,
)
from organizations.models import (
    AuditEntry,
    Invitation,
    Membership,
    Organization,
    Project,
    Role,
)
from organizations.selectors import ADMIN, WRITERS, check_role
from organizations.tasks import send_project_welcome_digest
from organizations.tokens import read_invitation_token
from outbox import publish
from users.models import User


def invitation_lifetime() -> timedelta:
    """Return how long an invitation and its link stay valid."""
    return timedelta(days=getattr(settings, "INVITATION_VALID_DAYS", 7))


def organization_key(organization: Organization) -> str:
    """Return the outbox key that orders an organization's events."""
    return f"org:{organization.pk}"


def create_organization(*, actor: User, name: str, slug: str) -> Organization:
    """Create an organization with actor as its first admin."""
    with transaction.atomic():
        try:
            with transaction.atomic():
                organization = Organization.objects.create(name=name, slug=slug)
        except IntegrityError:
            raise Conflict("This slug is taken.", field="slug") from None
        Membership.objects.create(
            user=actor, organization=organization, role=Role.ADMIN
        )
        _audit(organization, actor, "organization.created", organization)
        publish(
            "organization.created",
            {"organization_id": organization.pk, "actor_id": actor.pk},
            key=organization_key(organization),
        )
    return organization


def invite_member(
    *, actor: User, organization: Organization, email: str, role: str
) -> Invitation:
    """Invite email to join organization; a newer invitation replaces an open one."""
    email = User.objects.normalize_email(email)
    with transaction.atomic():
        _lock(organization)
        _require_role(actor, organization, ADMIN)
        if Membership.objects.filter(
            organization=organization, user__email__iexact=email
        ).exists():
            raise Conflict("This person is already a member.", field="email")
        now = timezone.now()
        # Lower(), as the one-open-invitation constraint compares: iexact's
        # UPPER() and it disagree on a few letters ("İ", the Kelvin sign).
        Invitation.objects.alias(address=Lower("email")).filter(
            organization=organization,
            address=Lower(Value(email)),
            accepted_at__isnull=True,
            revoked_at__isnull=True,
        ).update(revoked_at=now)
        try:
            with transaction.atomic():
                invitation = Invitation.objects.create(
                    organization=organization,
                    email=email,
                    role=role,
                    invited_by=actor,
                    expires_at=now + invitation_lifetime(),
                )
        except IntegrityError:
            raise Conflict(
                "An invitation to this address is already open.", field="email"
            ) from None
        _audit(organization, actor, "invitation.created", invitation, role=role)
        publish(
            "user.invited",
            {"invitation_id": invitation.pk},
            key=organization_key(organization),
            idempotency_key=f"user.invited:{invitation.pk}",
        )
    return invitation


@sensitive_variables("token", "password")
def accept_invitation(*, token: str, password: str) -> Membership:
    """Join the invitation's organization, creating the account if new.

    The invitation stands only while the person who sent it may still
    invite: an admin removed or demoted since has their open invitations
    revoked, and an invitation whose sender lost the role any other way (an
    account deactivated or deleted) is refused here.
    """
    invitation_id, email = read_invitation_token(token, max_age=invitation_lifetime())
    with transaction.atomic():
        # The organization first, as every membership change locks it, then
        # the invitation: the order remove_member() takes them in.
        organization_id = (
            Invitation.objects.filter(pk=invitation_id)
            .values_list("organization_id", flat=True)
            .first()
        )
        if organization_id is not None:
            _lock_id(organization_id)
        invitation = _open_invitation(invitation_id, email)
        organization = invitation.organization
        inviter = invitation.invited_by
        if (
            inviter is None
            or not inviter.is_active
            or not _has_role(inviter, organization, ADMIN)
        ):
            raise InvalidToken("This invitation is no longer valid.", field="token")
        user = _user_for(invitation.email, password)
        if Membership.objects.filter(organization=organization, user=user).exists():
            raise Conflict("You are already a member of this organization.")
        membership = Membership.objects.create(
            user=user, organization=organization, role=invitation.role
        )
        invitation.accepted_at = timezone.now()
        invitation.save(update_fields=["accepted_at"])
        _audit(organization, user, "invitation.accepted", invitation)
        publish(
            "membership.created",
            {"membership_id": membership.pk, "organization_id": organization.pk},
            key=organization_key(organization),
        )
    return membership


def revoke_invitation(
    *, actor: User, organization: Organization, invitation_id: int
) -> None:
    """Revoke one of organization's invitations; revoking twice is no error."""
    with transaction.atomic():
        _lock(organization)
        _require_role(actor, organization, ADMIN)
        invitation = (
            Invitation.objects.select_for_update()
            .filter(pk=invitation_id, organization=organization)
            .first()
        )
        if invitation is None:
            raise NotFound("No such invitation.")
        if invitation.accepted_at is not None:
            raise Conflict("This invitation was already accepted.")
        if invitation.revoked_at is not None:
            return
        invitation.revoked_at = timezone.now()
        invitation.save(update_fields=["revoked_at"])
        _audit(organization, actor, "invitation.revoked", invitation, reason="revoked")


def change_role(
    *, actor: User, organization: Organization, member: User, role: str
) -> Membership:
    """Give member a new role; the last admin cannot be demoted."""
    with transaction.atomic():
        _lock(organization)
        _require_role(actor, organization, ADMIN)
        membership = _membership(organization, member)
        old_role = membership.role
        if old_role == role:
            return membership
        if old_role == Role.ADMIN:
            _ensure_another_admin(organization, membership)
            _revoke_invitations_sent_by(member, organization, actor, "inviter demoted")
        membership.role = role
        membership.save(update_fields=["role"])
        _audit(
            organization,
            actor,
            "membership.role_changed",
            membership,
            old_role=old_role,
            new_role=role,
        )
        publish(
            "membership.role_changed",
            {
                "organization_id": organization.pk,
                "user_id": member.pk,
                "old_role": old_role,
                "new_role": role,
            },
            key=organization_key(organization),
        )
    return membership


def remove_member(*, actor: User, organization: Organization, member: User) -> None:
    """Remove member from organization; the last admin cannot be removed."""
    with transaction.atomic():
        _lock(organization)
        _require_role(actor, organization, ADMIN)
        membership = _membership(organization, member)
        if membership.role == Role.ADMIN:
            _ensure_another_admin(organization, membership)
        _revoke_invitations_sent_by(member, organization, actor, "inviter removed")
        membership.delete()
        _audit(organization, actor, "membership.removed", member, role=membership.role)
        publish(
            "membership.removed",
            {"organization_id": organization.pk, "user_id": member.pk},
            key=organization_key(organization),
        )


def create_project(*, actor: User, organization: Organization, name: str) -> Project:
    """Create a project in organization."""
    with transaction.atomic():
        _lock(organization)
        _require_role(actor, organization, WRITERS)
        try:
            with transaction.atomic():
                project = Project.objects.create(
                    organization=organization, name=name, created_by=actor
                )
        except IntegrityError:
            raise Conflict(
                "A project with this name already exists.", field="name"
            ) from None
        _audit(organization, actor, "project.created", project)
        publish(
            "project.created",
            {"project_id": project.pk, "actor_id": actor.pk},
            key=organization_key(organization),
        )
        # A task (django.tasks, on the outbox): written in this transaction.
        send_project_welcome_digest.enqueue(project.pk)
    return project


def _lock(organization: Organization) -> None:
    """Serialise the changes of one organization's members, invitations and
    projects, and the role checks they rest on."""
    _lock_id(organization.pk)


def _lock_id(organization_id: int) -> None:
    Organization.objects.select_for_update().filter(pk=organization_id).exists()


def _has_role(user: User, organization: Organization, roles: tuple[str, ...]) -> bool:
    return Membership.objects.filter(
        organization=organization, user=user, role__in=roles
    ).exists()


def _require_role(
    actor: User, organization: Organization, roles: tuple[str, ...]
) -> None:
    """Refuse an actor who is, by now, no member (404) or lacks the role (403)."""
    role = (
        Membership.objects.filter(organization=organization, user=actor)
        .values_list("role", flat=True)
        .first()
    )
    check_role(role, roles)


def _revoke_invitations_sent_by(
    inviter: User, organization: Organization, actor: User, reason: str
) -> None:
    """Revoke the open invitations inviter sent, as they lose the right to."""
    sent = Invitation.objects.select_for_update().filter(
        organization=organization,
        invited_by=inviter,
        accepted_at__isnull=True,
        revoked_at__isnull=True,
    )
    now = timezone.now()
    for invitation in sent:
        invitation.revoked_at = now
        invitation.save(update_fields=["revoked_at"])
        _audit(organization, actor, "invitation.revoked", invitation, reason=reason)


def _membership(organization: Organization, member: User) -> Membership:
    membership = Membership.objects.filter(
        organization=organization, user=member
    ).first()
    if membership is None:
        raise DomainError("This person is not a member.", field="user_id")
    return membership


def _ensure_another_admin(organization: Organization, membership: Membership) -> None:
    others = Membership.objects.filter(organization=organization, role=Role.ADMIN)
    if not others.exclude(pk=membership.pk).exists():
        raise Conflict("An organization needs at least one admin.")


def _open_invitation(invitation_id: int, email: str) -> Invitation:
    """Return the invitation, locked, if it can still be accepted."""
    invitation = (
        Invitation.objects.select_for_update(of=("self",))
        .select_related("organization")
        .filter(pk=invitation_id, email__iexact=email)
        .first()
    )
    if invitation is None:
        raise InvalidToken("This invitation link is not valid.", field="token")
    if invitation.revoked_at is not None:
        raise InvalidToken("This invitation was revoked.", field="token")
    if invitation.accepted_at is not None:
        raise InvalidToken("This invitation was already used.", field="token")
    if invitation.expires_at <= timezone.now():
        raise InvalidToken("This invitation has expired.", field="token")
    return invitation


@sensitive_variables("password")
def _user_for(email: str, password: str) -> User:
    """Return the account for email, creating it with password if new."""
    user = User.objects.filter(email__iexact=email).first()
    if user is not None:
        if not user.check_password(password):
            raise WrongPassword(
                "This is not the password of the existing account.", field="password"
            )
        if not user.is_active:
            raise Forbidden("This account is deactivated.")
        return user
    candidate = User(email=email)
    try:
        validate_password(password, user=candidate)
    except ValidationError as error:
        raise DomainError(" ".join(error.messages), field="password") from None
    try:
        with transaction.atomic():
            return User.objects.create_user(email, password)
    except IntegrityError:
        # Another invitation to this address was accepted at the same moment.
        raise Conflict(
            "An account for this address was created a moment ago: "
            "accept again with its password."
        ) from None


def _audit(
    organization: Organization,
    actor: User | None,
    action: str,
    subject: Any,
    **metadata: Any,
) -> AuditEntry:
    return AuditEntry.objects.create(
        organization=organization,
        actor=actor,
        action=action,
        subject_type=subject._meta.model_name,
        subject_id=str(subject.pk),
        metadata=metadata,
    )
