"""What every relay shares: the message, the connection per slot, the errors.

A relay is a subscriber (outbox.registry) whose handler publishes the
event's message to a broker and returns only once the broker acknowledged
it, so the outbox marks the delivery completed after the broker has it,
never before. A broker that is down or unreachable raises, and the delivery
is retried with the outbox's backoff; one that refuses the message raises
RelayRefused naming what it refused (a subject, a routing key), retried and
then failed like any handler's error.

A relay for another broker is one class: subclass Relay, implement open(),
send() and close(), name the errors that mean the connection is gone in
connection_errors, and check your options in problems().
"""

import json
import logging
import string
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

from django.core.serializers.json import DjangoJSONEncoder

if TYPE_CHECKING:
    from outbox.models import OutboxEvent

logger = logging.getLogger(__name__)

#: The fields a subject or routing key template may name.
TEMPLATE_FIELDS = frozenset({"event_type", "key"})


class RelayRefused(Exception):  # noqa: N818 - recorded as the attempt's error class
    """The broker took the connection but refused the message."""


@dataclass(frozen=True)
class Message:
    """An event as a relay publishes it: its payload as JSON, its identity in
    headers, and the W3C trace context of the span that published it."""

    event_id: str
    event_type: str
    key: str
    body: bytes
    headers: dict[str, str]
    #: The delivery's attempt, 1 for its first.
    attempt: int = 1

    @classmethod
    def of(cls, event: "OutboxEvent") -> "Message":
        headers = {
            "Outbox-Event-Id": str(event.uuid),
            "Outbox-Event-Type": event.event_type,
            "Outbox-Key": event.key,
            "Outbox-Created-At": event.created_at.isoformat(),
        }
        context = event.trace_context
        if isinstance(context, dict):
            for name in ("traceparent", "tracestate"):
                if isinstance(value := context.get(name), str) and value:
                    headers[name] = value
        body = json.dumps(
            event.payload,
            cls=DjangoJSONEncoder,
            ensure_ascii=False,
            separators=(",", ":"),
        )
        return cls(
            event_id=str(event.uuid),
            event_type=event.event_type,
            key=event.key,
            body=body.encode(),
            headers=headers,
            attempt=event.attempts,
        )

    def fill(self, template: str) -> str:
        """Return the template with the message's event type and key."""
        return template.format(event_type=self.event_type, key=self.key)


class Relay:
    """Publish each event's message to a broker; see the module's doc.

    One connection per worker slot (thread), opened on first use, reused,
    replaced after a loss, and closed when the slot ends (close_thread()).
    """

    #: Errors of send() that mean the connection is gone: it is replaced.
    connection_errors: ClassVar[tuple[type[BaseException], ...]] = (OSError,)

    def __init__(self, alias: str, options: Mapping[str, Any]) -> None:
        self.alias = alias
        self.options = dict(options)
        self._local = threading.local()

    # -- what a relay implements ------------------------------------------

    @classmethod
    def problems(cls, options: Mapping[str, Any]) -> list[str]:
        """Return what is wrong with these options, one message each."""
        return []

    def open(self) -> Any:
        """Connect to the broker; return the connection (any object)."""
        raise NotImplementedError

    def send(self, connection: Any, message: Message) -> None:
        """Publish the message; return once the broker acknowledged it."""
        raise NotImplementedError

    def close(self, connection: Any) -> None:
        """Close a connection open() returned."""
        raise NotImplementedError

    # -- what the outbox calls -----------------------------------------------

    def deliver(self, event: "OutboxEvent") -> None:
        """The relay's handler: publish the event, acknowledged, or raise."""
        message = Message.of(event)
        connection, reused = self._connection()
        try:
            self.send(connection, message)
        except self.connection_errors:
            self._drop()
            if not reused:
                raise
            # A reused connection may have died idle (a broker's heartbeat
            # timeout, a restart): send once more on a fresh one. The broker
            # may have the first send; a consumer sees the same message id.
            connection, _ = self._connection()
            try:
                self.send(connection, message)
            except self.connection_errors:
                self._drop()
                raise

    def close_thread(self) -> None:
        """Close this thread's connection, if it has one."""
        self._drop()

    def _connection(self) -> tuple[Any, bool]:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            return connection, True
        connection = self.open()
        self._local.connection = connection
        return connection, False

    def _drop(self) -> None:
        connection = getattr(self._local, "connection", None)
        self._local.connection = None
        if connection is None:
            return
        try:
            self.close(connection)
        except Exception as error:  # closing a broken connection may fail too
            logger.debug(
                "outbox relay %s: closing its connection failed: %s",
                self.alias,
                type(error).__name__,
            )


def template_problems(name: str, template: object) -> list[str]:
    """Check a subject or routing key template: a string naming known fields."""
    if not isinstance(template, str) or not template:
        return [f"{name} must be a non-empty string, got {template!r}."]
    try:
        fields = {
            field
            for _, field, _, _ in string.Formatter().parse(template)
            if field is not None
        }
    except ValueError as error:
        return [f"{name} {template!r} is not a valid template: {error}."]
    unknown = sorted(field for field in fields if field not in TEMPLATE_FIELDS)
    if unknown:
        return [
            f"{name} {template!r} names {', '.join(map(repr, unknown))}: a template "
            "may name only {event_type} and {key}."
        ]
    return []


def shown_url(value: object) -> str:
    """A URL as a check may print it: without its user and password."""
    if not isinstance(value, str):
        return type(value).__name__
    parts = urlsplit(value)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return repr(f"{parts.scheme}://{host}{port}{parts.path}" if parts.scheme else "…")


def is_url(value: object, schemes: tuple[str, ...]) -> bool:
    if not isinstance(value, str):
        return False
    parts = urlsplit(value)
    return parts.scheme in schemes and bool(parts.hostname)
