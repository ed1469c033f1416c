"""Emails about the organization domain: text and HTML from templates.

Each message's Message-ID is derived from the outbox event's UUID (and the
recipient, when one event mails several people), so a resend after a crash
carries the same id and receiving systems can drop the duplicate.
"""

from typing import Any
from uuid import UUID

from django.conf import settings
from django.core.mail import EmailMultiAlternatives
from django.template.loader import render_to_string


def send(
    template: str,
    *,
    to: str,
    context: dict[str, Any],
    event_uuid: UUID,
    recipient_id: int | str | None = None,
) -> None:
    """Render organizations/email/<template>.{subject,txt,html} and send it."""
    context = {"site_url": settings.SITE_URL, **context}
    prefix = f"organizations/email/{template}"
    subject = " ".join(render_to_string(f"{prefix}.subject.txt", context).split())
    message = EmailMultiAlternatives(
        subject=subject,
        body=render_to_string(f"{prefix}.txt", context),
        to=[to],
        headers={"Message-ID": message_id(event_uuid, recipient_id)},
    )
    message.attach_alternative(render_to_string(f"{prefix}.html", context), "text/html")
    message.send()


def message_id(event_uuid: UUID, recipient_id: int | str | None = None) -> str:
    """Return a Message-ID that is the same every time this email is sent."""
    local = (
        f"{event_uuid}.{recipient_id}" if recipient_id is not None else str(event_uuid)
    )
    domain = settings.DEFAULT_FROM_EMAIL.rpartition("@")[2].strip("> ") or "localhost"
    return f"<{local}@{domain}>"
