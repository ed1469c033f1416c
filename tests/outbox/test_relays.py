"""Relays to real brokers, NATS JetStream and RabbitMQ: outbox/relays.

Every test publishes to a stream or an exchange of its own
(tests/outbox/brokers.py); none mocks a broker.
"""

import asyncio
import gc
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings

from examples.relay_consumers import read_queue, read_stream
from outbox import NewEvent, publish, publish_many
from outbox.models import OutboxEvent, Status
from outbox.relays import NatsRelay, configured
from outbox.relays import nats as nats_relays
from outbox.relays.base import Message
from outbox.testing import drain
from tests.outbox.brokers import (
    AMQP_URL,
    NATS_URL,
    Exchange,
    NatsServer,
    Stream,
    free_port,
    jetstream_stream,
    rabbitmq_exchange,
    restart_rabbitmq,
)
from tests.outbox.conftest import FAST
from tests.outbox.worker_process import WorkerProcess, wait_until

pytestmark = pytest.mark.django_db


@pytest.fixture
def stream() -> Iterator[Stream]:
    with jetstream_stream() as created:
        yield created


@pytest.fixture
def exchange() -> Iterator[Exchange]:
    with rabbitmq_exchange() as created:
        yield created


def nats_relay(stream: Stream, *, servers: str = NATS_URL, **extra: Any) -> dict:
    return {
        "BACKEND": "outbox.relays.NatsRelay",
        "EVENT_TYPES": ["user.*", "project.created"],
        "OPTIONS": {
            "servers": servers,
            "subject": f"{stream.prefix}.{{event_type}}",
            "ack_timeout": 2,
            **extra,
        },
    }


def amqp_relay(exchange: Exchange, routing_key: str = "{event_type}") -> dict:
    return {
        "BACKEND": "outbox.relays.RabbitMQRelay",
        "EVENT_TYPES": ["*"],
        "OPTIONS": {
            "url": AMQP_URL,
            "exchange": exchange.name,
            "routing_key": routing_key,
        },
    }


def relays(**configured: dict) -> Any:
    return override_settings(OUTBOX={**FAST, "RELAYS": configured})


def until_done() -> None:
    """Drain, and again as retries come due, until nothing is unfinished."""
    for _ in range(200):
        drain()
        if not OutboxEvent.objects.filter(
            status__in=[Status.PENDING, Status.PROCESSING]
        ).exists():
            return
        OutboxEvent.objects.filter(status=Status.PENDING).update(
            available_at=OutboxEvent.objects.order_by("id").first().created_at  # type: ignore[union-attr]
        )
    raise AssertionError("events still unfinished")


# -- the messages ---------------------------------------------------------------


def test_nats__publishes_the_payload_with_the_outbox_headers_once_acked(stream) -> None:
    with relays(bus=nats_relay(stream)):
        event = publish(
            "user.invited", {"invitation_id": 7, "name": "Zoë"}, key="org-1"
        )
        assert drain().completed == 2  # the reference app's mail handler, and the relay

    ((headers, data, subject),) = stream.messages()
    assert subject == f"{stream.prefix}.user.invited"
    assert json.loads(data) == {"invitation_id": 7, "name": "Zoë"}
    assert headers["Nats-Msg-Id"] == headers["Outbox-Event-Id"] == str(event.uuid)
    assert headers["Outbox-Event-Type"] == "user.invited"
    assert headers["Outbox-Key"] == "org-1"
    assert headers["Outbox-Created-At"] == event.created_at.isoformat()
    delivery = OutboxEvent.objects.get(uuid=event.uuid, subscriber="bus")
    assert delivery.status == Status.COMPLETED


def test_nats__slots_share_one_event_loop_each_on_its_own_connection(stream) -> None:
    def threads() -> list[str]:
        return [thread.name for thread in threading.enumerate()]

    with relays(bus=nats_relay(stream)):
        relay = configured()["bus"][0]
        events = [publish("user.invited", {"slot": n}) for n in range(2)]
        delivered, closing = threading.Barrier(3), threading.Barrier(3)
        connections = []

        def slot(event: OutboxEvent) -> None:
            relay.deliver(event)
            connections.append(relay._local.connection)
            delivered.wait(10)
            closing.wait(10)
            relay.close_thread()  # as a slot that ends does

        slots = [threading.Thread(target=slot, args=(event,)) for event in events]
        for thread in slots:
            thread.start()
        delivered.wait(10)
        first, second = connections
        assert first.client is not second.client  # one connection per slot
        assert first.loop is second.loop  # on one event loop
        assert threads().count("outbox-relay-bus") == 1
        closing.wait(10)
        for thread in slots:
            thread.join(10)

    assert first.client.is_closed and second.client.is_closed
    assert "outbox-relay-bus" not in threads()  # ended with the last connection
    assert len(stream.messages()) == 2


def test_nats__a_failed_connect_leaves_no_socket_open(stream) -> None:
    """A broker that takes the connection and says nothing (stalled) fails
    each open(); with the relay's loop kept alive by another slot's
    connection, nothing of those attempts may stay open."""

    def open_files() -> int:
        gc.collect()
        return len(os.listdir("/proc/self/fd"))

    with socket.create_server(("127.0.0.1", 0), backlog=64) as stalled:
        port = stalled.getsockname()[1]
        stalled_url = f"nats://127.0.0.1:{port}"
        with relays(bus=nats_relay(stream, connect_timeout=0.2)):
            relay = configured()["bus"][0]
            assert isinstance(relay, NatsRelay)
            alive = relay.open()  # another slot's: keeps the loop running
            try:
                before = open_files()
                failing = NatsRelay("bus", {**relay.options, "servers": stalled_url})
                failing._loop = relay._loop  # the relay's one loop, as in a worker
                for _ in range(10):
                    with pytest.raises(relay.connection_errors):
                        failing.open()
                assert open_files() == before
            finally:
                relay.close(alive)


def test_nats__a_publish_given_up_on_is_never_sent_later(stream, monkeypatch) -> None:
    """A slot that stops waiting for its PubAck (the loop stalled past the
    ack timeout) retries the delivery: the publish it gave up on must not
    go out once the loop runs again, or the stream would hold the event
    without the outbox knowing."""
    monkeypatch.setattr(nats_relays, "MARGIN", 0.1)
    with relays(bus=nats_relay(stream, ack_timeout=0.2)):
        relay = configured()["bus"][0]
        assert isinstance(relay, NatsRelay)
        connection = relay.open()
        try:
            loop = connection.loop
            loop.run(asyncio.sleep(0), timeout=1)  # the loop is running
            assert loop._loop is not None
            loop._loop.call_soon_threadsafe(time.sleep, 1.0)  # stalled
            message = Message.of(publish("user.invited", {"n": 1}))
            with pytest.raises(relay.connection_errors):
                relay.send(connection, message)
            # Once the loop is free again, whatever it sent has reached the server.
            loop.run(connection.client.flush(), timeout=5)
        finally:
            relay.close(connection)

    assert stream.messages() == []


def test_rabbitmq__publishes_persistent_mandatory_messages_with_properties(
    exchange,
) -> None:
    with relays(amqp=amqp_relay(exchange)):
        event = publish("project.created", {"project_id": 3}, key="org-1")
        drain()

    ((properties, body),) = exchange.messages()
    assert json.loads(body) == {"project_id": 3}
    assert properties.message_id == str(event.uuid)
    assert properties.type == "project.created"
    assert properties.content_type == "application/json"
    assert properties.delivery_mode == 2
    assert properties.headers["Outbox-Event-Id"] == str(event.uuid)
    assert properties.headers["Outbox-Key"] == "org-1"


def test_relays__pass_the_trace_context_on(stream, exchange) -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with relays(bus=nats_relay(stream), amqp=amqp_relay(exchange)):
        event = publish("user.invited", {"invitation_id": 1})
        OutboxEvent.objects.filter(uuid=event.uuid).update(
            trace_context={"traceparent": traceparent}
        )
        drain()

    ((headers, _, _),) = stream.messages()
    ((properties, _),) = exchange.messages()
    assert headers["traceparent"] == properties.headers["traceparent"] == traceparent


# -- refusals and failures ---------------------------------------------------------


def test_nats__no_stream_for_the_subject__is_retried_then_failed_naming_it(
    stream,
) -> None:
    relay = nats_relay(stream)
    relay["OPTIONS"]["subject"] = "nostream.{event_type}"
    with relays(bus=relay):
        event = publish("user.invited", {"invitation_id": 1}, max_attempts=2)
        until_done()

    delivery = OutboxEvent.objects.get(uuid=event.uuid, subscriber="bus")
    assert (delivery.status, delivery.attempts) == (Status.FAILED, 2)
    assert (
        "no JetStream stream takes subject 'nostream.user.invited'"
        in delivery.last_error
    )
    assert delivery.last_error.startswith("outbox.relays.base.RelayRefused")


def test_rabbitmq__an_unroutable_message__is_retried_then_failed_naming_the_key(
    exchange,
) -> None:
    with (
        rabbitmq_exchange(binding="nothing.matches") as unbound,
        relays(amqp=amqp_relay(unbound)),
    ):
        event = publish("project.created", {"project_id": 3}, max_attempts=2)
        until_done()

    delivery = OutboxEvent.objects.get(uuid=event.uuid, subscriber="amqp")
    assert (delivery.status, delivery.attempts) == (Status.FAILED, 2)
    assert "routes routing key 'project.created' to no queue" in delivery.last_error


def test_nats__a_broker_that_is_down__is_retried_and_nothing_is_lost(stream) -> None:
    down = f"nats://127.0.0.1:{free_port()}"
    relay = nats_relay(stream, servers=down, connect_timeout=0.5)
    # A backoff of a minute: one drain makes one attempt, then waits.
    with override_settings(
        OUTBOX={
            "BACKOFF_BASE_MS": 60_000,
            "BACKOFF_CAP_MS": 60_000,
            "RELAYS": {"bus": relay},
        }
    ):
        event = publish("user.invited", {"invitation_id": 1})
        drain()
        delivery = OutboxEvent.objects.get(uuid=event.uuid, subscriber="bus")
        assert (delivery.status, delivery.attempts) == (Status.PENDING, 1)
        assert delivery.last_error.startswith("nats.errors.NoServersError")
    with relays(bus=nats_relay(stream)):  # the broker is back
        until_done()

    assert [headers["Outbox-Event-Id"] for headers, _, _ in stream.messages()] == [
        str(event.uuid)
    ]


def test_one_relay_failing__does_not_rerun_or_fail_the_others(stream, exchange) -> None:
    refused = nats_relay(stream)
    refused["OPTIONS"]["subject"] = "nostream.{event_type}"
    with relays(bus=refused, amqp=amqp_relay(exchange)):
        event = publish("user.invited", {"invitation_id": 1}, max_attempts=3)
        until_done()

    statuses = dict(
        OutboxEvent.objects.filter(uuid=event.uuid).values_list("subscriber", "status")
    )
    assert statuses == {
        "": Status.COMPLETED,
        "amqp": Status.COMPLETED,
        "bus": Status.FAILED,
    }
    assert len(exchange.messages()) == 1  # sent once, not again with each retry


# -- the checks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("relay", "message"),
    [
        (
            {"BACKEND": "outbox.relays.KafkaRelay", "EVENT_TYPES": ["*"]},
            "cannot be imported",
        ),
        (
            {"BACKEND": "outbox.models.OutboxEvent", "EVENT_TYPES": ["*"]},
            "is not a relay",
        ),
        (
            {
                "BACKEND": "outbox.relays.NatsRelay",
                "EVENT_TYPES": ["*"],
                "OPTIONS": {"servers": "http://x", "subject": "e.{event_type}"},
            },
            "['servers'] has 'http://x', not a nats:// URL",
        ),
        (
            {
                "BACKEND": "outbox.relays.RabbitMQRelay",
                "EVENT_TYPES": ["*"],
                "OPTIONS": {"url": "nats://x", "exchange": "e", "routing_key": "k"},
            },
            "['url'] must be an amqp:// URL",
        ),
        (
            {"BACKEND": "outbox.relays.NatsRelay", "EVENT_TYPES": []},
            "['EVENT_TYPES'] must list the event types it relays",
        ),
        (
            {
                "BACKEND": "outbox.relays.NatsRelay",
                "EVENT_TYPES": ["*"],
                "OPTIONS": {"servers": NATS_URL, "subject": "e.{payload}"},
            },
            "names 'payload': a template may name only {event_type} and {key}",
        ),
        (
            {
                "BACKEND": "outbox.relays.RabbitMQRelay",
                "EVENT_TYPES": ["*"],
                "OPTIONS": {
                    "url": AMQP_URL,
                    "exchange": "e",
                    "routing_key": "{event_type",
                },
            },
            "is not a valid template",
        ),
    ],
)
def test_checks__name_the_relay_and_what_is_wrong(relay, message) -> None:
    with (
        override_settings(OUTBOX={"RELAYS": {"bus": relay}}),
        pytest.raises(SystemCheckError) as raised,
    ):
        call_command("check")

    assert "settings.OUTBOX['RELAYS']['bus']" in str(raised.value)
    assert message in str(raised.value)


def test_checks__accept_the_issues_example() -> None:
    with relays(
        bus={
            "BACKEND": "outbox.relays.NatsRelay",
            "EVENT_TYPES": ["user.*", "project.created"],
            "OPTIONS": {"servers": NATS_URL, "subject": "events.{event_type}"},
        },
        amqp={
            "BACKEND": "outbox.relays.RabbitMQRelay",
            "EVENT_TYPES": ["*"],
            "OPTIONS": {
                "url": AMQP_URL,
                "exchange": "events",
                "routing_key": "{event_type}",
            },
        },
    ):
        call_command("check")


def test_relays__never_take_tasks(stream) -> None:
    from outbox import registry

    with relays(bus={**nats_relay(stream), "EVENT_TYPES": ["*"]}):
        assert registry.subscribers("task:myapp.tasks.send") == ("",)
        assert "bus" in registry.subscribers("anything.else")


# -- worker processes ---------------------------------------------------------------


def relay_environment(
    stream: Stream, exchange: Exchange, servers: str = NATS_URL
) -> dict:
    return {
        "OUTBOX_RELAY_NATS_SERVERS": servers,
        "OUTBOX_RELAY_NATS_SUBJECT": f"{stream.prefix}.{{event_type}}",
        "OUTBOX_RELAY_NATS_EVENT_TYPES": "relay.*",
        "OUTBOX_RELAY_AMQP_URL": AMQP_URL,
        "OUTBOX_RELAY_AMQP_EXCHANGE": exchange.name,
        "OUTBOX_RELAY_AMQP_EVENT_TYPES": "relay.*",
    }


def as_the_worker(stream: Stream, exchange: Exchange, servers: str = NATS_URL) -> Any:
    """This process's relays as relay_environment() gives the worker's: a
    publisher writes a delivery for each relay the worker runs."""
    return relays(
        bus={**nats_relay(stream, servers=servers), "EVENT_TYPES": ["relay.*"]},
        amqp={**amqp_relay(exchange), "EVENT_TYPES": ["relay.*"]},
    )


def keyed_events(count: int, keys: int) -> list[NewEvent]:
    return [
        NewEvent(
            "relay.order", {"key": f"order-{n % keys}", "n": n}, key=f"order-{n % keys}"
        )
        for n in range(count)
    ]


def all_completed(total: int) -> bool:
    return OutboxEvent.objects.filter(status=Status.COMPLETED).count() == total


def assert_in_key_order(received: list[Any], count: int) -> None:
    """Each event once, and each key's events in publish order."""
    assert sorted(m.payload["n"] for m in received) == list(range(count))
    by_key: dict[str, list[int]] = {}
    for message in received:
        by_key.setdefault(message.key, []).append(message.payload["n"])
    assert all(numbers == sorted(numbers) for numbers in by_key.values())


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_worker_process__a_consumer_sees_each_event_once_in_key_order(
    stream, exchange, workers
) -> None:
    worker = WorkerProcess(
        "--concurrency", "8", environment=relay_environment(stream, exchange)
    )
    workers.append(worker)
    with as_the_worker(stream, exchange):
        publish_many(keyed_events(300, keys=7))
    wait_until(lambda: all_completed(600), timeout=60, context=lambda: worker.output)
    assert worker.stop() == 0

    assert_in_key_order(read_stream(NATS_URL, stream.name), 300)
    assert_in_key_order(read_queue(AMQP_URL, exchange.queue), 300)


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_worker_process__kill_9_mid_relay_loses_nothing(
    stream, exchange, workers
) -> None:
    environment = relay_environment(stream, exchange)
    first = WorkerProcess(
        "--concurrency", "4", "--stuck-timeout-ms", "1000", environment=environment
    )
    workers.append(first)
    with as_the_worker(stream, exchange):
        events = publish_many(keyed_events(400, keys=400))
    wait_until(
        lambda: OutboxEvent.objects.filter(status=Status.COMPLETED).count() >= 100,
        timeout=60,
        context=lambda: first.output,
    )
    first.send(signal.SIGKILL)
    first.wait()
    second = WorkerProcess(
        "--concurrency", "4", "--stuck-timeout-ms", "1000", environment=environment
    )
    workers.append(second)
    wait_until(lambda: all_completed(800), timeout=90, context=lambda: second.output)
    assert second.stop() == 0

    ids = {str(event.uuid) for event in events}
    # JetStream kept one message per Nats-Msg-Id; RabbitMQ may hold a
    # repeat, with the same message_id.
    stored = stream.messages()
    assert sorted(h["Outbox-Event-Id"] for h, _, _ in stored) == sorted(ids)
    queued = exchange.messages()
    assert {properties.message_id for properties, _ in queued} == ids
    assert all(
        properties.message_id == properties.headers["Outbox-Event-Id"]
        for properties, _ in queued
    )


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_worker_process__a_broker_restart_mid_run_delivers_everything(
    tmp_path, workers
) -> None:
    server = NatsServer(tmp_path / "jetstream")
    server.start()
    try:
        with jetstream_stream(server.url) as stream, rabbitmq_exchange() as exchange:
            worker = WorkerProcess(
                "--concurrency",
                "4",
                environment={
                    **relay_environment(stream, exchange, servers=server.url),
                    "OUTBOX_BACKOFF_BASE_MS": "50",
                    "OUTBOX_BACKOFF_CAP_MS": "200",
                },
            )
            workers.append(worker)
            with as_the_worker(stream, exchange, servers=server.url):
                publish_many(keyed_events(300, keys=300))
            wait_until(
                lambda: (
                    OutboxEvent.objects.filter(
                        subscriber="bus", status=Status.COMPLETED
                    ).count()
                    >= 50
                ),
                timeout=60,
                context=lambda: worker.output,
            )
            server.kill()  # the broker goes away mid-run, then comes back
            wait_until(
                lambda: (
                    OutboxEvent.objects.filter(subscriber="bus")
                    .exclude(last_error="")
                    .exists()
                ),
                timeout=30,
                context=lambda: worker.output,
            )
            server.start()
            wait_until(
                lambda: all_completed(600), timeout=90, context=lambda: worker.output
            )
            assert worker.stop() == 0

            assert len(stream.messages()) == 300
            assert len({p.message_id for p, _ in exchange.messages()}) == 300
    finally:
        server.kill()


def test_nats__a_connection_lost_between_deliveries_is_replaced(
    tmp_path, register_handler
) -> None:
    server = NatsServer(tmp_path / "jetstream")
    server.start()

    def restart_the_broker(event: OutboxEvent) -> None:
        server.kill()
        server.start()

    register_handler("broker.restart", restart_the_broker)
    try:
        with (
            jetstream_stream(server.url) as stream,
            relays(
                bus={
                    **nats_relay(stream, servers=server.url),
                    "EVENT_TYPES": ["relay.*"],
                }
            ),
        ):
            publish("relay.order", {"n": 1})  # opens the slot's connection
            publish("broker.restart", {})  # which the restart breaks
            publish("relay.order", {"n": 2})  # sent on a new one

            result = drain()

            assert (result.completed, result.retried) == (3, 0)
            assert len(stream.messages()) == 2
    finally:
        server.kill()


@pytest.mark.slow
def test_rabbitmq__a_connection_lost_to_a_broker_restart_is_replaced(
    register_handler,
) -> None:
    def restart_the_broker(event: OutboxEvent) -> None:
        restart_rabbitmq()

    register_handler("broker.restart", restart_the_broker)
    with (
        rabbitmq_exchange(durable=True) as exchange,
        relays(amqp={**amqp_relay(exchange), "EVENT_TYPES": ["relay.*"]}),
    ):
        publish("relay.order", {"n": 1})  # opens the slot's connection
        publish("broker.restart", {})  # which the restart breaks
        publish("relay.order", {"n": 2})  # sent on a new one

        result = drain()

        assert (result.completed, result.retried) == (3, 0)
        assert sorted(json.loads(body)["n"] for _, body in exchange.messages()) == [
            1,
            2,
        ]


# -- what the review found ----------------------------------------------------------


@pytest.mark.parametrize(
    "relay",
    [
        {
            "BACKEND": "outbox.relays.NatsRelay",
            "EVENT_TYPES": ["*"],
            "OPTIONS": {"servers": "https://user:S3cretPass@mq:4222", "subject": "e"},
        },
        {
            "BACKEND": "outbox.relays.RabbitMQRelay",
            "EVENT_TYPES": ["*"],
            "OPTIONS": {
                "url": "https://user:S3cretPass@mq:5672/",
                "exchange": "e",
                "routing_key": "k",
            },
        },
    ],
)
def test_checks__never_print_a_brokers_password(relay) -> None:
    with (
        override_settings(OUTBOX={"RELAYS": {"bus": relay}}),
        pytest.raises(SystemCheckError) as raised,
    ):
        call_command("check")

    assert "'https://mq:" in str(raised.value)
    assert "S3cretPass" not in str(raised.value)


def test_a_relay_this_process_cannot_run__still_gets_its_deliveries(stream) -> None:
    """A web process without the relay's library, or with options only the
    worker refuses, still writes the relay's rows: the worker relays them,
    or fails them where an operator sees it; none is silently missing."""
    broken = nats_relay(stream, ack_timeout="5")
    with relays(bus=broken):
        event = publish("user.invited", {"invitation_id": 1}, max_attempts=1)
        drain()

    delivery = OutboxEvent.objects.get(uuid=event.uuid, subscriber="bus")
    assert delivery.status == Status.FAILED
    assert "no handler named 'bus' registered for 'user.invited'" in delivery.last_error


def test_nats__a_message_over_the_servers_limit_fails_at_once_naming_it(
    stream,
) -> None:
    with relays(bus=nats_relay(stream)):
        event = publish("user.invited", {"blob": "x" * 1_048_500})
        drain()

    delivery = OutboxEvent.objects.get(uuid=event.uuid, subscriber="bus")
    assert (delivery.status, delivery.attempts) == (Status.FAILED, 1)
    assert "the NATS server takes at most 1048576" in delivery.last_error


def test_rabbitmq__a_routing_key_amqp_cannot_carry_fails_at_once(exchange) -> None:
    with relays(amqp=amqp_relay(exchange, routing_key="{key}")):
        event = publish("project.created", {}, key="é" * 150)  # 300 bytes
        drain()

    delivery = OutboxEvent.objects.get(uuid=event.uuid, subscriber="amqp")
    assert (delivery.status, delivery.attempts) == (Status.FAILED, 1)
    assert "at most 255 bytes" in delivery.last_error


def test_nats__two_relays_into_one_stream_are_told(stream, caplog) -> None:
    first, second = nats_relay(stream), nats_relay(stream)
    first["OPTIONS"]["subject"] = f"{stream.prefix}.a.{{event_type}}"
    second["OPTIONS"]["subject"] = f"{stream.prefix}.b.{{event_type}}"
    with relays(bus=first, audit=second):
        publish("user.invited", {"invitation_id": 1})
        drain()

    assert len(stream.messages()) == 1  # JetStream kept one per Nats-Msg-Id
    assert any(
        "does another relay publish into stream" in r.message for r in caplog.records
    )
