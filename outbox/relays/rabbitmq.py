"""RabbitMQRelay: publish events to a RabbitMQ exchange, completed once confirmed.

OPTIONS:
- url: "amqp://user:password@host:5672/%2F" (amqps:// for TLS);
- exchange: the exchange's name (it must exist: the relay declares nothing);
- routing_key: a template naming {event_type} (and {key}), e.g. "{event_type}".

The channel is in confirm mode and each message is published mandatory and
persistent, with message_id the event's UUID, type the event type,
content_type application/json and the Outbox-* headers: the delivery is
completed once the broker confirmed it, and a message no queue is bound to
take is returned, and retried as refused, not dropped. Needs pika (the
"rabbitmq" extra).
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from outbox.errors import PermanentFailure
from outbox.relays.base import (
    Message,
    Relay,
    RelayRefused,
    is_url,
    shown_url,
    template_problems,
)

try:
    import pika
    import pika.exceptions
except ImportError:  # pragma: no cover - the extra is installed in dev
    pika = None


@dataclass
class _Connection:
    connection: Any
    channel: Any


def _connection_errors() -> tuple[type[BaseException], ...]:
    if pika is None:  # pragma: no cover
        return (OSError,)
    return (
        OSError,
        pika.exceptions.AMQPConnectionError,
        pika.exceptions.StreamLostError,
    )


class RabbitMQRelay(Relay):
    connection_errors: ClassVar[tuple[type[BaseException], ...]] = _connection_errors()

    @classmethod
    def problems(cls, options: Mapping[str, Any]) -> list[str]:
        found = []
        if pika is None:
            found.append("needs pika: install the 'rabbitmq' extra.")
        url = options.get("url")
        if not is_url(url, ("amqp", "amqps")):
            found.append(
                f"OPTIONS['url'] must be an amqp:// URL, got {shown_url(url)}."
            )
        exchange = options.get("exchange")
        if not isinstance(exchange, str):
            found.append(f"OPTIONS['exchange'] must be a string, got {exchange!r}.")
        found += template_problems("OPTIONS['routing_key']", options.get("routing_key"))
        timeout = options.get("blocked_timeout", 30)
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or timeout <= 0
        ):
            found.append(
                "OPTIONS['blocked_timeout'] must be a positive number of seconds."
            )
        return found

    def open(self) -> _Connection:
        assert pika is not None  # noqa: S101 - the checks refuse the relay without it
        parameters = pika.URLParameters(self.options["url"])
        if parameters.blocked_connection_timeout is None:
            # A broker under a resource alarm blocks publishers: give up
            # after this long, and the delivery is retried, rather than hold
            # the slot (and, by the heartbeat, its lease) for ever.
            parameters.blocked_connection_timeout = self.options.get(
                "blocked_timeout", 30
            )
        connection = pika.BlockingConnection(parameters)
        try:
            channel = connection.channel()
            channel.confirm_delivery()
        except BaseException:
            connection.close()
            raise
        return _Connection(connection, channel)

    def send(self, connection: Any, message: Message) -> None:
        exchange = self.options["exchange"]
        routing_key = message.fill(self.options["routing_key"])
        properties = pika.BasicProperties(
            message_id=message.event_id,
            type=message.event_type,
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Persistent,
            headers=message.headers,
        )
        try:
            connection.channel.basic_publish(
                exchange, routing_key, message.body, properties, mandatory=True
            )
        except pika.exceptions.UnroutableError:
            raise RelayRefused(
                f"RabbitMQ exchange {exchange!r} routes routing key {routing_key!r} "
                "to no queue"
            ) from None
        except pika.exceptions.NackError:
            raise RelayRefused(
                f"RabbitMQ refused (nacked) routing key {routing_key!r} on exchange "
                f"{exchange!r}"
            ) from None
        except pika.exceptions.ShortStringTooLong:
            raise PermanentFailure(
                f"AMQP cannot carry event type or routing key {routing_key[:60]!r}…: "
                "each is at most 255 bytes"
            ) from None
        except pika.exceptions.ChannelClosedByBroker as error:
            self._drop()  # the channel is gone; the connection with it
            raise RelayRefused(
                f"RabbitMQ closed the channel publishing routing key {routing_key!r} "
                f"to exchange {exchange!r}: {error.reply_code} {error.reply_text}"
            ) from None

    def close(self, connection: Any) -> None:
        if connection.connection.is_open:
            connection.connection.close()
