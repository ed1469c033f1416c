"""The real brokers the relay tests publish to: a JetStream stream and a
RabbitMQ exchange with a queue, each unique per test, removed after it."""

import asyncio
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pika
import pika.exceptions

NATS_URL = "nats://127.0.0.1:4222"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
RABBITMQCTL = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"


@dataclass(frozen=True)
class Stream:
    name: str
    #: Subjects under it are the stream's: prefix + ".anything".
    prefix: str
    servers: str = NATS_URL

    def info(self) -> Any:
        async def info() -> Any:
            client = await nats.connect(self.servers)
            try:
                return await client.jetstream().stream_info(self.name)
            finally:
                await client.close()

        return asyncio.run(info())

    def messages(self) -> list[Any]:
        """Every message the stream holds, in order: (headers, data, subject)."""

        async def read() -> list[Any]:
            client = await nats.connect(self.servers)
            try:
                stream = client.jetstream()
                total = (await stream.stream_info(self.name)).state.messages
                consumer = await stream.pull_subscribe(">", stream=self.name)
                found: list[Any] = []
                while len(found) < total:
                    for message in await consumer.fetch(200, timeout=5):
                        await message.ack()
                        found.append(
                            (message.headers or {}, message.data, message.subject)
                        )
                return found
            finally:
                await client.close()

        return asyncio.run(read())


@contextmanager
def jetstream_stream(servers: str = NATS_URL) -> Iterator[Stream]:
    token = secrets.token_hex(4)
    stream = Stream(
        name=f"OUTBOX_TEST_{token}", prefix=f"outboxtest{token}", servers=servers
    )

    async def create() -> None:
        client = await nats.connect(servers)
        try:
            await client.jetstream().add_stream(
                name=stream.name, subjects=[f"{stream.prefix}.>"]
            )
        finally:
            await client.close()

    async def delete() -> None:
        client = await nats.connect(servers)
        try:
            await client.jetstream().delete_stream(stream.name)
        finally:
            await client.close()

    asyncio.run(create())
    try:
        yield stream
    finally:
        asyncio.run(delete())


@dataclass(frozen=True)
class Exchange:
    name: str
    queue: str

    def messages(self) -> list[tuple[Any, bytes]]:
        """Take every message waiting in the queue: (properties, body)."""
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        try:
            channel = connection.channel()
            found: list[tuple[Any, bytes]] = []
            while True:
                method, properties, body = channel.basic_get(self.queue, auto_ack=True)
                if method is None:
                    return found
                found.append((properties, body))
        finally:
            connection.close()


@contextmanager
def rabbitmq_exchange(
    binding: str = "#", *, durable: bool = False
) -> Iterator[Exchange]:
    """A topic exchange, and a queue bound to it by binding (durable: both
    outlive a broker restart)."""
    token = secrets.token_hex(4)
    exchange = Exchange(name=f"outbox-test-{token}", queue=f"outbox-test-{token}")
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        channel.exchange_declare(exchange.name, exchange_type="topic", durable=durable)
        channel.queue_declare(exchange.queue, durable=durable)
        channel.queue_bind(exchange.queue, exchange.name, routing_key=binding)
        yield exchange
    finally:
        try:
            connection.close()
        except pika.exceptions.AMQPError:
            pass  # the test restarted the broker under it
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        try:
            channel = connection.channel()
            channel.queue_delete(exchange.queue)
            channel.exchange_delete(exchange.name)
        finally:
            connection.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class NatsServer:
    """A nats-server of the test's own, with JetStream, to stop and restart."""

    def __init__(self, store: Path) -> None:
        self.port = free_port()
        self.store = store
        self.url = f"nats://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                NATS_SERVER,
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-js",
                "-sd",
                str(self.store),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def restart_rabbitmq() -> None:
    """Stop RabbitMQ's application and start it again, as a broker restart."""
    subprocess.run(
        [RABBITMQCTL, "stop_app"], check=True, capture_output=True, timeout=60
    )
    try:
        time.sleep(0.5)
    finally:
        subprocess.run(
            [RABBITMQCTL, "start_app"], check=True, capture_output=True, timeout=120
        )
        subprocess.run(
            [RABBITMQCTL, "await_startup"],
            check=True,
            capture_output=True,
            timeout=120,
        )
