"""Handlers of the organization domain's events: the emails they cause.

Payloads carry ids; each handler loads what it needs and, when the rows are
gone or the situation changed (an invitation revoked, a member deleted),
completes without sending. A malformed payload is a PermanentFailure; an SMTP
error propagates and the outbox retries it.
"""

from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.utils import timezone

from organizations import emails
from organizations.models import Invitation, Membership, Organization, Project, Role
from organizations.tokens import make_invitation_token
from outbox import PermanentFailure, handler
from outbox.models import OutboxEvent
from users.models import User


def ids(event: OutboxEvent, *names: str) -> list[int]:
    """Return the payload's integer ids, or fail the event for good."""
    payload: Any = event.payload
    if not isinstance(payload, dict):
        raise PermanentFailure(f"the payload of {event.event_type} is not an object")
    values = [payload.get(name) for name in names]
    missing = [
        name
        for name, value in zip(names, values, strict=True)
        if not isinstance(value, int) or isinstance(value, bool)
    ]
    if missing:
        raise PermanentFailure(
            f"the payload of {event.event_type} lacks integer {', '.join(missing)}"
        )
    return [int(value) for value in values]  # type: ignore[arg-type]


@handler("user.invited")
def send_invitation(event: OutboxEvent) -> None:
    """Mail the invitation link, unless it was revoked, used or has expired."""
    [invitation_id] = ids(event, "invitation_id")
    invitation = (
        Invitation.objects.select_related("organization", "invited_by")
        .filter(pk=invitation_id)
        .first()
    )
    if invitation is None or not _is_open(invitation):
        return
    token = make_invitation_token(invitation)
    emails.send(
        "invitation",
        to=invitation.email,
        context={
            "invitation": invitation,
            "organization": invitation.organization,
            "inviter": invitation.invited_by.get_full_name()
            if invitation.invited_by
            else "Someone",
            # In the fragment, which browsers never send: no Referer header or
            # access log sees the token (the page posts it to the API).
            "accept_url": f"{settings.SITE_URL}/invitations/accept#token={token}",
        },
        event_uuid=event.uuid,
    )


@handler("organization.created")
def send_welcome(event: OutboxEvent) -> None:
    """Welcome the organization's creator."""
    _tell_user(event, "welcome", user_field="actor_id")


@handler("membership.created")
def announce_new_member(event: OutboxEvent) -> None:
    """Tell the organization's admins who joined."""
    membership_id, _ = ids(event, "membership_id", "organization_id")
    membership = (
        Membership.objects.select_related("user", "organization")
        .filter(pk=membership_id)
        .first()
    )
    if membership is None:
        return  # left again before the worker got here
    admins = User.objects.filter(
        memberships__organization=membership.organization,
        memberships__role=Role.ADMIN,
        is_active=True,
    ).exclude(pk=membership.user_id)
    _tell_each(
        event,
        "member_joined",
        admins,
        recipient_name="admin",
        context={
            "member": membership.user,
            "membership": membership,
            "organization": membership.organization,
        },
    )


@handler("membership.role_changed")
def tell_role_changed(event: OutboxEvent) -> None:
    """Tell the member their new role."""
    ids(event, "organization_id", "user_id")
    roles = [event.payload.get("old_role"), event.payload.get("new_role")]
    if not all(role in Role.values for role in roles):
        raise PermanentFailure("the payload of membership.role_changed lacks roles")
    _tell_user(
        event,
        "role_changed",
        user_field="user_id",
        context={
            "old_role": Role(roles[0]).label.lower(),
            "new_role": Role(roles[1]).label.lower(),
        },
    )


@handler("membership.removed")
def tell_removed(event: OutboxEvent) -> None:
    """Tell the former member they were removed."""
    _tell_user(event, "removed", user_field="user_id")


@handler("project.created")
def announce_project(event: OutboxEvent) -> None:
    """Tell the organization's other members about the new project."""
    project_id, actor_id = ids(event, "project_id", "actor_id")
    project = (
        Project.objects.select_related("organization").filter(pk=project_id).first()
    )
    if project is None:
        return
    creator = User.objects.filter(pk=actor_id).first()
    members = User.objects.filter(
        memberships__organization=project.organization, is_active=True
    ).exclude(pk=actor_id)
    _tell_each(
        event,
        "project_created",
        members,
        recipient_name="user",
        context={
            "project": project,
            "organization": project.organization,
            "creator": creator.get_full_name() if creator else "Someone",
        },
    )


def _tell_each(
    event: OutboxEvent,
    template: str,
    recipients: Iterable[User],
    *,
    recipient_name: str,
    context: dict[str, Any],
) -> None:
    """Mail each recipient, each message with its own stable Message-ID."""
    for recipient in recipients:
        emails.send(
            template,
            to=recipient.email,
            context={**context, recipient_name: recipient},
            event_uuid=event.uuid,
            recipient_id=recipient.pk,
        )


def _tell_user(
    event: OutboxEvent,
    template: str,
    *,
    user_field: str,
    context: dict[str, Any] | None = None,
) -> None:
    """Mail one person about an organization, if both still exist."""
    organization_id, user_id = ids(event, "organization_id", user_field)
    organization = Organization.objects.filter(pk=organization_id).first()
    user = User.objects.filter(pk=user_id, is_active=True).first()
    if organization is None or user is None:
        return
    emails.send(
        template,
        to=user.email,
        context={"organization": organization, "user": user, **(context or {})},
        event_uuid=event.uuid,
    )


def _is_open(invitation: Invitation) -> bool:
    return (
        invitation.accepted_at is None
        and invitation.revoked_at is None
        and invitation.expires_at > timezone.now()
    )
