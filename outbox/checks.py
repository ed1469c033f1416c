from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, register

from outbox.conf import problems


@register()
def check_outbox_settings(**kwargs: Any) -> list[CheckMessage]:
    """Report every invalid entry of settings.OUTBOX."""
    raw = getattr(settings, "OUTBOX", None)
    if raw is None:
        return []
    if not isinstance(raw, dict):
        return [Error("settings.OUTBOX must be a dict.", id="outbox.E001")]
    return [Error(message, id="outbox.E002") for message in problems(raw)]
