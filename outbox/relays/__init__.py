"""Relays: subscribers that publish events to a message broker.

Configured in settings.OUTBOX["RELAYS"]; each relay is a subscriber, named
by its alias, of the event types its EVENT_TYPES patterns match (fnmatch:
"user.*", "*"; tasks' "task:" types never), with its own delivery of each
event: its own status, attempts, retries and order per key. A delivery is
completed only once the broker acknowledged the message.

    OUTBOX = {
        "RELAYS": {
            "bus": {
                "BACKEND": "outbox.relays.NatsRelay",
                "EVENT_TYPES": ["user.*", "project.created"],
                "OPTIONS": {"servers": "nats://127.0.0.1:4222",
                            "subject": "events.{event_type}"},
            },
        },
    }
"""

import fnmatch
import threading
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver
from django.utils.module_loading import import_string

from outbox.relays.base import Message, Relay, RelayRefused
from outbox.relays.nats import NatsRelay
from outbox.relays.rabbitmq import RabbitMQRelay

__all__ = [
    "Message",
    "NatsRelay",
    "RabbitMQRelay",
    "Relay",
    "RelayRefused",
    "close_connections",
    "configured",
    "relaying",
]


_configured: dict[str, tuple[Relay, tuple[str, ...]]] | None = None
_building = threading.Lock()


def configured() -> dict[str, tuple[Relay, tuple[str, ...]]]:
    """The relays this process can run, by alias, each with its patterns.

    Built on first use, once (slot threads may ask together). A relay whose
    settings the system checks refuse (an unknown backend, bad options, its
    client library missing) is left out here: the worker's start reports it,
    naming it, and a delivery of it that reaches a worker anyway fails
    visibly ("no handler named ..."). Who subscribes is decided by
    relaying(), from the settings alone.
    """
    global _configured  # one set per process, until the settings change
    with _building:
        if _configured is None:
            _configured = _build()
        return _configured


def _build() -> dict[str, tuple[Relay, tuple[str, ...]]]:
    from outbox.conf import get_settings

    try:
        settings = get_settings()
    except ImproperlyConfigured:
        return {}
    relays = {}
    for alias, config in sorted(settings.relays.items()):
        options = config.get("OPTIONS") or {}
        try:
            backend = import_string(config["BACKEND"])
        except ImportError:
            continue
        if not (isinstance(backend, type) and issubclass(backend, Relay)):
            continue
        if backend.problems(options):
            continue
        relays[alias] = (backend(alias, options), tuple(config["EVENT_TYPES"]))
    return relays


def relaying(event_type: str) -> list[str]:
    """Return the aliases of the relays whose patterns match event_type.

    From the settings alone, not from the relays this process could build: a
    web process without a broker's client library (or with options only the
    worker's checks refuse) still writes the relay's deliveries, which a
    worker that can run them relays, and one that cannot fails visibly. A
    relay's subscriptions never depend on what is installed where.
    """
    from outbox.conf import get_settings
    from outbox.registry import TASK_EVENT_PREFIX

    if event_type.startswith(TASK_EVENT_PREFIX):
        return []
    return sorted(
        alias
        for alias, config in get_settings().relays.items()
        if any(fnmatch.fnmatchcase(event_type, p) for p in config["EVENT_TYPES"])
    )


def relay(alias: str) -> Relay | None:
    found = configured().get(alias)
    return found[0] if found else None


def close_connections() -> None:
    """Close this thread's broker connections (a slot that ends calls it)."""
    for found, _ in configured().values():
        found.close_thread()


@receiver(setting_changed)
def _forget_relays(*, setting: str, **kwargs: Any) -> None:
    global _configured
    if setting == "OUTBOX":
        with _building:
            old, _configured = _configured, None
        for found, _ in (old or {}).values():
            found.close_thread()
