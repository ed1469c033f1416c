"""The outbox's settings: settings.OUTBOX (a dict) merged over defaults.

Read on use, never at import, so override_settings works and a broken value
is reported by the system checks (checks.py) rather than by an import error.
"""

import functools
import os
import socket
from dataclasses import dataclass, field, fields
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver

POSITIVE_INTEGERS = (
    "POLL_MS",
    "BATCH_SIZE",
    "STUCK_TIMEOUT_MS",
    "MAX_ATTEMPTS",
    "BACKOFF_BASE_MS",
    "BACKOFF_CAP_MS",
    "PRUNE_AFTER_DAYS",
    "PRUNE_FAILED_AFTER_DAYS",
    "CONCURRENCY",
    "MAX_PAYLOAD_BYTES",
    "METRICS_PORT",
)
#: The longest worker id: the columns that record it (OutboxEvent.locked_by,
#: OutboxWorker.worker_id) are varchar(200).
WORKER_ID_MAX_LENGTH = 200
#: The shortest METRICS_TOKEN: one a scraper sends, not a password to guess.
TOKEN_MIN_LENGTH = 24
#: The highest TCP port, for METRICS_PORT.
MAX_PORT = 65535
#: The longest queue name: OutboxEvent.queue_name is varchar(200).
QUEUE_NAME_MAX_LENGTH = 200


@dataclass(frozen=True)
class OutboxSettings:
    poll_ms: int = 2000
    batch_size: int = 32
    #: Handlers in flight at once in one worker process. 1 keeps handlers in
    #: the worker's own thread: nothing in them needs to be thread-safe.
    concurrency: int = 1
    stuck_timeout_ms: int = 60_000
    max_attempts: int = 10
    backoff_base_ms: int = 1000
    backoff_cap_ms: int = 60_000
    worker_id: str = ""
    listen: bool = True
    #: Workers delete completed events older than this many days; None: never.
    prune_after_days: int | None = None
    #: Workers delete failed events this many days after they failed (their
    #: failed_at); None: never, they wait for an operator.
    prune_failed_after_days: int | None = None
    #: publish() refuses a payload whose JSON is longer: a payload carries
    #: ids, not documents, and every claim reads the payloads it takes.
    max_payload_bytes: int = 1_048_576
    #: Workers serve Prometheus metrics on this port (outbox.metrics); None: off.
    metrics_port: int | None = None
    #: The bearer token outbox.metrics.metrics_view asks for; "": view off.
    metrics_token: str = ""
    #: Broker relays by alias: {"BACKEND", "EVENT_TYPES", "OPTIONS"} (outbox.relays).
    relays: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def default_worker_id(self) -> str:
        """Return the configured worker id, or <host>-<pid>."""
        return self.worker_id or f"{socket.gethostname()}-{os.getpid()}"


def problems(raw: dict[str, Any]) -> list[str]:
    """Return one message per invalid entry of a settings.OUTBOX dict."""
    messages = []
    known = {field.name.upper() for field in fields(OutboxSettings)}
    for name in sorted(set(raw) - known):
        messages.append(
            f"settings.OUTBOX[{name!r}] is not a known setting: expected one of "
            f"{', '.join(sorted(known))}."
        )
    for name in POSITIVE_INTEGERS:
        if name in raw and _positive_int(raw[name]) is None:
            messages.append(
                f"settings.OUTBOX[{name!r}] (environment variable OUTBOX_{name}) "
                f"must be a positive integer, got {raw[name]!r}."
            )
    if "WORKER_ID" in raw:
        messages += _worker_id_problems(raw["WORKER_ID"])
    port = _positive_int(raw.get("METRICS_PORT"))
    if port is not None and port > MAX_PORT:
        messages.append(
            f"settings.OUTBOX['METRICS_PORT'] (environment variable "
            f"OUTBOX_METRICS_PORT) must be a port number up to {MAX_PORT}, "
            f"got {raw['METRICS_PORT']!r}."
        )
    if "METRICS_TOKEN" in raw and not _is_token(raw["METRICS_TOKEN"]):
        messages.append(
            "settings.OUTBOX['METRICS_TOKEN'] (environment variable "
            f"OUTBOX_METRICS_TOKEN) must be a string of at least {TOKEN_MIN_LENGTH} "
            "characters, or empty to turn the metrics view off."
        )
    if "LISTEN" in raw and not isinstance(raw["LISTEN"], bool):
        messages.append("settings.OUTBOX['LISTEN'] must be True or False.")
    if "RELAYS" in raw:
        messages += relay_problems(raw["RELAYS"])
    return messages


#: What a relay's settings hold.
RELAY_KEYS = frozenset({"BACKEND", "EVENT_TYPES", "OPTIONS"})


def relay_problems(relays: object) -> list[str]:
    """The shape of settings.OUTBOX["RELAYS"]; checks.py checks each backend."""
    from outbox.registry import SUBSCRIBER_NAME

    if not isinstance(relays, dict):
        return ["settings.OUTBOX['RELAYS'] must be a dict of relays by alias."]
    found = []
    for alias, config in relays.items():
        name = f"settings.OUTBOX['RELAYS'][{alias!r}]"
        if not isinstance(alias, str) or not SUBSCRIBER_NAME.fullmatch(alias):
            found.append(
                f"{name}: an alias is 1 to 100 letters, digits and . _ : - (it names "
                "the relay's deliveries)."
            )
        if not isinstance(config, dict):
            found.append(f"{name} must be a dict with BACKEND and EVENT_TYPES.")
            continue
        for unknown in sorted(set(config) - RELAY_KEYS, key=str):
            found.append(
                f"{name}[{unknown!r}] is not a relay setting: expected BACKEND, "
                "EVENT_TYPES or OPTIONS."
            )
        backend = config.get("BACKEND")
        if not isinstance(backend, str) or not backend:
            found.append(f"{name}['BACKEND'] must name a relay class, got {backend!r}.")
        types = config.get("EVENT_TYPES")
        if (
            not isinstance(types, list | tuple)
            or not types
            or not all(isinstance(pattern, str) and pattern for pattern in types)
        ):
            found.append(
                f"{name}['EVENT_TYPES'] must list the event types it relays (patterns "
                f"such as 'user.*' or '*'), got {types!r}."
            )
        if not isinstance(config.get("OPTIONS", {}), dict):
            found.append(f"{name}['OPTIONS'] must be a dict.")
    return found


def check_worker_id(value: object, *, name: str) -> str:
    """Return value if it can name a worker; raise ValueError or TypeError."""
    # Late: settings modules import this one, and storable brings Django's
    # JSON encoder, whose imports reach the ORM.
    from outbox.storable import check_text

    return check_text(value, name=name, limit=WORKER_ID_MAX_LENGTH)


def _is_token(value: object) -> bool:
    return isinstance(value, str) and (not value or len(value) >= TOKEN_MIN_LENGTH)


def check_queue_name(value: object, *, name: str) -> str:
    """Return value if it can name a queue; raise ValueError or TypeError."""
    from outbox.storable import check_text

    text = check_text(value, name=name, limit=QUEUE_NAME_MAX_LENGTH)
    if not text.strip():
        raise ValueError(f"{name} must not be empty.")
    if text != text.strip():
        raise ValueError(f"{name} {text!r} has spaces around it.")
    return text


def _worker_id_problems(value: object) -> list[str]:
    try:
        check_worker_id(value, name="settings.OUTBOX['WORKER_ID']")
    except (TypeError, ValueError) as error:
        return [
            f"{str(error).removesuffix('.')} (environment variable OUTBOX_WORKER_ID)."
        ]
    return []


def get_settings() -> OutboxSettings:
    """Return the validated outbox settings, raising on an invalid value.

    Cached (publish() reads them for every event) until a test overrides
    the setting.
    """
    return _load()


@receiver(setting_changed)
def _forget_cached_settings(*, setting: str, **kwargs: Any) -> None:
    if setting == "OUTBOX":
        _load.cache_clear()


@functools.cache
def _load() -> OutboxSettings:
    raw: dict[str, Any] = dict(getattr(settings, "OUTBOX", None) or {})
    found = problems(raw)
    if found:
        raise ImproperlyConfigured(" ".join(found))
    values: dict[str, Any] = {
        name.lower(): (_positive_int(value) if name in POSITIVE_INTEGERS else value)
        for name, value in raw.items()
    }
    return OutboxSettings(**values)


def _positive_int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    try:
        number = int(value)
    except ValueError:
        return None
    return number if number > 0 else None
