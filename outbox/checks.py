import fnmatch
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, register
from django.db import connections, router

from outbox.conf import get_settings, problems
from outbox.models import OutboxEvent


@register()
def check_outbox_settings(**kwargs: Any) -> list[CheckMessage]:
    """Report every invalid entry of settings.OUTBOX."""
    raw = getattr(settings, "OUTBOX", None)
    if raw is None:
        return []
    if not isinstance(raw, dict):
        return [Error("settings.OUTBOX must be a dict.", id="outbox.E001")]
    errors: list[CheckMessage] = [
        Error(message, id="outbox.E002") for message in problems(raw)
    ]
    if not errors:
        errors += _concurrency_errors()
        errors += _metrics_errors()
        errors += _relay_errors()
    return errors


def _relay_errors() -> list[CheckMessage]:
    """Each relay's backend must be a Relay, with options it accepts."""
    from django.utils.module_loading import import_string

    from outbox import registry
    from outbox.relays.base import Relay

    errors: list[CheckMessage] = []
    for alias, config in get_settings().relays.items():
        name = f"settings.OUTBOX['RELAYS'][{alias!r}]"
        try:
            backend = import_string(config["BACKEND"])
        except ImportError as error:
            errors.append(
                Error(
                    f"{name}['BACKEND'] {config['BACKEND']!r} cannot be imported: "
                    f"{error}.",
                    id="outbox.E005",
                )
            )
            continue
        if not (isinstance(backend, type) and issubclass(backend, Relay)):
            errors.append(
                Error(
                    f"{name}['BACKEND'] {config['BACKEND']!r} is not a relay "
                    "(a subclass of outbox.relays.Relay).",
                    id="outbox.E005",
                )
            )
            continue
        errors += [
            Error(f"{name}: {problem}", id="outbox.E006")
            for problem in backend.problems(config.get("OPTIONS") or {})
        ]
        errors += [
            Error(
                f"{name}: the alias {alias!r} is also the name of a handler of "
                f"{event_type!r}; a subscriber's name is unique per event type.",
                id="outbox.E007",
            )
            for event_type in registry.event_types_subscribed_by(alias)
            if any(fnmatch.fnmatchcase(event_type, p) for p in config["EVENT_TYPES"])
        ]
    return errors


def _metrics_errors() -> list[CheckMessage]:
    """Refuse a metrics port without the library that serves it."""
    from outbox import metrics

    if get_settings().metrics_port is None or metrics.available():
        return []
    return [
        Error(
            "settings.OUTBOX['METRICS_PORT'] (environment variable "
            "OUTBOX_METRICS_PORT) is set, but prometheus-client is not "
            "installed: install the 'metrics' extra, or unset it.",
            id="outbox.E004",
        )
    ]


def _concurrency_errors() -> list[CheckMessage]:
    """Refuse handlers in parallel on a database whose writers take turns."""
    concurrency = get_settings().concurrency
    vendor = connections[router.db_for_write(OutboxEvent)].vendor
    if concurrency > 1 and vendor == "sqlite":
        return [
            Error(
                f"settings.OUTBOX['CONCURRENCY'] (environment variable "
                f"OUTBOX_CONCURRENCY) is {concurrency}, but the outbox's database "
                "is SQLite, where writers take turns: use 1, or PostgreSQL.",
                id="outbox.E003",
            )
        ]
    return []
