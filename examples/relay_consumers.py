"""A consumer's view of the outbox's relays: read what they published.

Run against the brokers the relays publish to. A relay publishes each
event at least once: after a crash between the broker's acknowledgement
and the outbox's completed mark, the same event is published again, with
the same Outbox-Event-Id (JetStream's Nats-Msg-Id, AMQP's message_id).
JetStream keeps one message per id within its duplicate window; a RabbitMQ
queue keeps both. So a consumer de-duplicates by Outbox-Event-Id, and sees
each event once, a key's events in publish order.

    python -m examples.relay_consumers nats STREAM
    python -m examples.relay_consumers amqp QUEUE
"""

import asyncio
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Received:
    event_id: str
    event_type: str
    key: str
    payload: Any


class Deduplicator:
    """Pass each event once, however many times it arrives.

    A real consumer keeps the ids it handled in its own database, in the
    transaction of the work it does for each (a unique column), for as long
    as a duplicate may arrive; in memory here, for the example.
    """

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def first_time(self, event_id: str) -> bool:
        if event_id in self._seen:
            return False
        self._seen.add(event_id)
        return True


def read_stream(servers: str, stream: str, subject: str = ">") -> list[Received]:
    """Every message in a JetStream stream, once each, in stream order."""
    import nats

    async def read() -> list[Received]:
        client = await nats.connect(servers)
        try:
            state = await client.jetstream().stream_info(stream)
            consumer = await client.jetstream().pull_subscribe(subject, stream=stream)
            messages: list[Received] = []
            while len(messages) < state.state.messages:
                for message in await consumer.fetch(100, timeout=5):
                    await message.ack()
                    messages.append(_received(message.headers or {}, message.data))
            return messages
        finally:
            await client.close()

    deduplicator = Deduplicator()
    return [m for m in asyncio.run(read()) if deduplicator.first_time(m.event_id)]


def read_queue(url: str, queue: str) -> list[Received]:
    """Every message waiting in a RabbitMQ queue, once each, in queue order."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        deduplicator = Deduplicator()
        received = []
        for _, properties, body in _drain(channel, queue):
            headers = dict(properties.headers or {})
            # message_id is Outbox-Event-Id, for consumers that read only it.
            assert properties.message_id == headers["Outbox-Event-Id"]  # noqa: S101
            message = _received(headers, body)
            if deduplicator.first_time(message.event_id):
                received.append(message)
        return received
    finally:
        connection.close()


def _drain(channel: Any, queue: str) -> Iterator[tuple[Any, Any, bytes]]:
    while True:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            return
        yield method, properties, body


def _received(headers: dict[str, Any], body: bytes) -> Received:
    return Received(
        event_id=headers["Outbox-Event-Id"],
        event_type=headers["Outbox-Event-Type"],
        key=headers["Outbox-Key"],
        payload=json.loads(body),
    )


if __name__ == "__main__":
    kind, name = sys.argv[1], sys.argv[2]
    found = (
        read_stream("nats://127.0.0.1:4222", name)
        if kind == "nats"
        else read_queue("amqp://guest:guest@127.0.0.1:5672/%2F", name)
    )
    for message in found:
        print(message.event_id, message.event_type, message.key, message.payload)  # noqa: T201
