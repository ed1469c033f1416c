"""The relay workload: events relayed to NATS JetStream and RabbitMQ by one
worker process, beside the broker's own client publishing the same messages
with the same guarantee (each acknowledged before it counts) and no outbox.

The client runs as the worker's slots do: one connection per thread, one
message in flight per thread, at 1 and 16 threads; the share_of_bare target
compares concurrency 16 with the 16 threads. For JetStream, the client is
also measured as an asyncio program would run it: one event loop, 16
connections, one message in flight on each (share_of_one_loop). nats-py is
much faster that way than with 16 threads each driving a loop (those take
turns at the GIL), faster than a worker process, which also claims and
records every event, can follow. Each run has a stream or an exchange and
queue of its own, removed after it.
"""

import asyncio
import json
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import nats
import pika
from django.test import override_settings

from benchmarks import workloads
from benchmarks.workloads import PAYLOAD, Measurement

NATS_URL = "nats://127.0.0.1:4222"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
EVENT_TYPE = "benchmark.relay"


def relay(events: int, broker: str) -> list[Measurement]:
    """Ours at concurrency 1 and 16, the bare client at 1 and 16 threads."""
    results = []
    for concurrency in (1, 16):
        with _destination(broker) as (config, publish_bare):
            results.append(_through_the_outbox(events, broker, concurrency, config))
        with _destination(broker) as (_, publish_bare):
            results.append(_bare(events, broker, concurrency, publish_bare))
    ours_16, bare_16 = results[2], results[3]
    ours_16.notes["share_of_bare"] = ours_16.rate / bare_16.rate
    if broker == "jetstream":
        with _stream(secrets.token_hex(4)) as subject:
            one_loop = _bare_nats_one_loop(
                events, subject.format(event_type=EVENT_TYPE), 16
            )
        results.append(one_loop)
        ours_16.notes["share_of_one_loop"] = ours_16.rate / one_loop.rate
    return results


def _through_the_outbox(
    events: int, broker: str, concurrency: int, config: dict[str, Any]
) -> Measurement:
    workloads.reset()
    relays = {"relay": config}
    with override_settings(OUTBOX={"RELAYS": relays}):
        workloads.fill(events, EVENT_TYPE)
    worker = workloads.start_worker(
        "--drain",
        "--concurrency",
        str(concurrency),
        environment={"BENCHMARK_RELAYS": json.dumps(relays)},
    )
    marks: dict[float, float] = {}
    while len(marks) < 2:
        done = 1 - workloads.not_completed() / events
        for mark in (0.1, 0.9):
            if done >= mark and mark not in marks:
                marks[mark] = time.perf_counter()
        if worker.poll() is not None and len(marks) < 2:
            raise RuntimeError("the relay benchmark's worker stopped early")
        # Seldom enough that counting costs the two CPUs little: the bare
        # client beside it pays no such count.
        time.sleep(0.05)
    if worker.wait(timeout=300):
        raise RuntimeError("a benchmark worker failed")
    return Measurement(
        f"relay to {broker}, 1 process, concurrency {concurrency}",
        int(events * 0.8),
        marks[0.9] - marks[0.1],
    )


def _bare(
    events: int, broker: str, threads: int, publish: Callable[[int], None]
) -> Measurement:
    per_thread = [events // threads + (n < events % threads) for n in range(threads)]
    started = time.perf_counter()
    workers = [threading.Thread(target=publish, args=(count,)) for count in per_thread]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    return Measurement(
        f"{broker} client alone, {threads} thread{'s' if threads > 1 else ''}",
        events,
        time.perf_counter() - started,
    )


@contextmanager
def _destination(broker: str) -> Iterator[tuple[dict[str, Any], Callable[[int], None]]]:
    token = secrets.token_hex(4)
    if broker == "jetstream":
        with _stream(token) as subject:
            yield (
                {
                    "BACKEND": "outbox.relays.NatsRelay",
                    "EVENT_TYPES": [EVENT_TYPE],
                    "OPTIONS": {"servers": NATS_URL, "subject": subject},
                },
                lambda count: _publish_nats(
                    subject.format(event_type=EVENT_TYPE), count
                ),
            )
    else:
        with _exchange(token) as exchange:
            yield (
                {
                    "BACKEND": "outbox.relays.RabbitMQRelay",
                    "EVENT_TYPES": [EVENT_TYPE],
                    "OPTIONS": {
                        "url": AMQP_URL,
                        "exchange": exchange,
                        "routing_key": "{event_type}",
                    },
                },
                lambda count: _publish_amqp(exchange, count),
            )


@contextmanager
def _stream(token: str) -> Iterator[str]:
    name, prefix = f"BENCH_{token}", f"bench{token}"

    async def manage(create: bool) -> None:
        client = await nats.connect(NATS_URL)
        try:
            if create:
                await client.jetstream().add_stream(name=name, subjects=[f"{prefix}.>"])
            else:
                await client.jetstream().delete_stream(name)
        finally:
            await client.close()

    asyncio.run(manage(create=True))
    try:
        yield prefix + ".{event_type}"
    finally:
        asyncio.run(manage(create=False))


@contextmanager
def _exchange(token: str) -> Iterator[str]:
    name = f"bench-{token}"
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    channel.exchange_declare(name, exchange_type="topic")
    channel.queue_declare(name)
    channel.queue_bind(name, name, routing_key="#")
    try:
        yield name
    finally:
        channel.queue_delete(name)
        channel.exchange_delete(name)
        connection.close()


def _headers() -> dict[str, str]:
    """The headers the relay sends, Created-At as long as a real one."""
    event_id = str(uuid.uuid4())
    return {
        "Outbox-Event-Id": event_id,
        "Outbox-Event-Type": EVENT_TYPE,
        "Outbox-Key": "",
        "Outbox-Created-At": "2026-12-04T00:00:00.123456+00:00",
    }


#: The body the relay sends for the workload's events (Message.of()).
BODY = json.dumps(PAYLOAD, ensure_ascii=False, separators=(",", ":")).encode()


def _publish_nats(subject: str, count: int) -> None:
    async def publish() -> None:
        client = await nats.connect(NATS_URL)
        stream = client.jetstream()
        try:
            for _ in range(count):
                headers = _headers()
                headers["Nats-Msg-Id"] = headers["Outbox-Event-Id"]
                await stream.publish(subject, BODY, headers=headers, timeout=5)
        finally:
            await client.close()

    asyncio.run(publish())


def _bare_nats_one_loop(events: int, subject: str, connections: int) -> Measurement:
    """The client in one event loop: a connection per task, each waiting for
    its PubAck before its next publish."""

    async def publish(stream: Any, count: int) -> None:
        for _ in range(count):
            headers = _headers()
            headers["Nats-Msg-Id"] = headers["Outbox-Event-Id"]
            await stream.publish(subject, BODY, headers=headers, timeout=5)

    async def run() -> float:
        clients = [await nats.connect(NATS_URL) for _ in range(connections)]
        try:
            counts = [
                events // connections + (n < events % connections)
                for n in range(connections)
            ]
            started = time.perf_counter()
            await asyncio.gather(
                *(
                    publish(client.jetstream(), count)
                    for client, count in zip(clients, counts, strict=True)
                )
            )
            return time.perf_counter() - started
        finally:
            for client in clients:
                await client.close()

    return Measurement(
        f"jetstream client alone, 1 event loop, {connections} connections",
        events,
        asyncio.run(run()),
    )


def _publish_amqp(exchange: str, count: int) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for _ in range(count):
            headers = _headers()
            channel.basic_publish(
                exchange,
                EVENT_TYPE,
                BODY,
                pika.BasicProperties(
                    message_id=headers["Outbox-Event-Id"],
                    type=EVENT_TYPE,
                    content_type="application/json",
                    delivery_mode=pika.DeliveryMode.Persistent,
                    headers=headers,
                ),
                mandatory=True,
            )
    finally:
        connection.close()
