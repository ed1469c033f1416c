"""OpenTelemetry trace context from publish() to the handler (outbox/tracing.py).

The process's TracerProvider can be set once: a module fixture sets an SDK
one with an in-memory exporter, and each test clears what it exported.
make test-compat leaves this file out (no OpenTelemetry there); the app
without it is tests/outbox/test_without_opentelemetry.py.
"""

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from opentelemetry import baggage, context, trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import (
    TraceContextTextMapPropagator,
)

from outbox import NewEvent, publish, publish_many
from outbox.models import OutboxEvent, Status
from outbox.testing import DRAIN_WORKER_ID, drain
from tests.outbox import worker_process

tracer = trace.get_tracer(__name__)
#: A caller's context, as a request from another service would bring it.
REMOTE_TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()  # the spans of later modules' tests go nowhere


class BreakingProcessor(SpanProcessor):
    """A project's span processor that raises for the spans whose name starts
    with broken, as the SDK lets it: the outbox must go on as without tracing."""

    broken = ""

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        if self.broken and span.name.startswith(self.broken):
            raise RuntimeError("the span processor is broken")

    def on_end(self, span: ReadableSpan) -> None:
        if self.broken and span.name.startswith(self.broken):
            raise RuntimeError("the span processor is broken")


@pytest.fixture(scope="module")
def breaking(exporter: InMemorySpanExporter) -> Iterator[BreakingProcessor]:
    processor = BreakingProcessor()
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    provider.add_span_processor(processor)
    yield processor
    processor.broken = ""


@pytest.fixture
def spans(exporter: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    exporter.clear()
    yield exporter
    exporter.clear()


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def traceparent(span: trace.Span) -> str:
    found = span.get_span_context()
    return f"00-{found.trace_id:032x}-{found.span_id:016x}-{found.trace_flags:02x}"


# -- publish() ------------------------------------------------------------------


@pytest.mark.django_db
def test_publish__stores_the_spans_traceparent_and_tracestate_not_baggage(
    spans,
) -> None:
    remote = TraceContextTextMapPropagator().extract(
        {"traceparent": REMOTE_TRACEPARENT, "tracestate": "vendor=opaque"}
    )
    remote = baggage.set_baggage("user.email", "alice@example.com", context=remote)
    token = context.attach(remote)
    try:
        with tracer.start_as_current_span("request") as span:
            event = publish("traced.ok", {})
            [many] = publish_many([NewEvent("traced.ok", {})])
    finally:
        context.detach(token)

    stored = OutboxEvent.objects.get(pk=event.pk).trace_context
    assert stored == {"traceparent": traceparent(span), "tracestate": "vendor=opaque"}
    assert stored["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")
    assert OutboxEvent.objects.get(pk=many.pk).trace_context == stored


@pytest.mark.django_db
def test_publish__stores_null_outside_a_span_and_no_empty_tracestate(spans) -> None:
    untraced = publish("traced.ok", {})
    with tracer.start_as_current_span("request") as span:
        traced = publish("traced.ok", {})

    assert OutboxEvent.objects.get(pk=untraced.pk).trace_context is None
    assert OutboxEvent.objects.get(pk=traced.pk).trace_context == {
        "traceparent": traceparent(span)
    }


# -- the worker -------------------------------------------------------------------


@pytest.mark.django_db
def test_drain__each_handler_runs_in_a_span_linked_to_its_publisher(
    spans, register_handler
) -> None:
    register_handler("traced.ok", lambda event: None)
    with tracer.start_as_current_span("request") as publisher:
        keyed = publish("traced.ok", {}, key="order-7")
        plain = publish("traced.ok", {})
    untraced = publish("traced.ok", {})
    spans.clear()

    drain()

    [receive] = named(spans, "receive outbox")
    processed = {
        span.attributes["outbox.event.id"]: span
        for span in named(spans, "process traced.ok")
        if span.attributes
    }
    published = publisher.get_span_context()
    assert receive.kind is SpanKind.CLIENT
    assert dict(receive.attributes or {}) == {
        "messaging.system": "outbox",
        "messaging.operation.type": "receive",
        "messaging.operation.name": "receive",
        "messaging.batch.message_count": 3,
        "messaging.client.id": DRAIN_WORKER_ID,
    }
    assert [link.context.span_id for link in receive.links] == [published.span_id] * 2
    assert set(processed) == {keyed.pk, plain.pk, untraced.pk}
    for span in processed.values():
        assert span.kind is SpanKind.CONSUMER
        assert span.parent is not None
        assert span.parent.span_id == receive.context.span_id
        assert span.context.trace_id == receive.context.trace_id
        assert span.status.status_code is StatusCode.UNSET
    [link] = processed[keyed.pk].links
    assert (link.context.trace_id, link.context.span_id) == (
        published.trace_id,
        published.span_id,
    )
    assert dict(processed[keyed.pk].attributes or {}) == {
        "messaging.system": "outbox",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "traced.ok",
        "messaging.message.id": str(keyed.uuid),
        "messaging.client.id": DRAIN_WORKER_ID,
        "outbox.event.id": keyed.pk,
        "outbox.event.type": "traced.ok",
        "outbox.event.key": "order-7",
        "outbox.event.attempt": 1,
        "outbox.queue": "default",
        "outbox.outcome": "completed",
    }
    assert "outbox.event.key" not in (processed[plain.pk].attributes or {})
    assert len(processed[plain.pk].links) == 1
    assert processed[untraced.pk].links == ()


@pytest.mark.django_db
def test_drain__a_failed_handlers_span_is_an_error_with_the_message_redacted(
    spans, register_handler
) -> None:
    def refuses(event: OutboxEvent) -> None:
        raise ValueError("no mailbox for alice@example.com")

    register_handler("traced.fails", refuses)
    publish("traced.fails", {}, max_attempts=1)

    drain()

    [span] = named(spans, "process traced.fails")
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "ValueError"
    assert [(event.name, dict(event.attributes or {})) for event in span.events] == [
        (
            "exception",
            {
                "exception.type": "ValueError",
                "exception.message": "no mailbox for <email>",
            },
        )
    ]
    assert (span.attributes or {})["outbox.outcome"] == "failed"
    assert "alice" not in span.to_json()


def opens_a_span(event: OutboxEvent) -> None:
    with tracer.start_as_current_span("handler work"):
        pass


async def opens_spans_async(event: OutboxEvent) -> None:
    with tracer.start_as_current_span("handler work"):
        await asyncio.sleep(0)
    # As the ORM's calls do: back in the slot's thread, through sync_to_async.
    await sync_to_async(opens_a_span)(event)


@pytest.mark.parametrize("handler", [opens_a_span, opens_spans_async])
@pytest.mark.django_db
def test_drain__spans_the_handler_opens_are_children_of_its_span(
    spans, register_handler, handler
) -> None:
    register_handler("traced.nested", handler)
    publish("traced.nested", {})

    drain()

    [process] = named(spans, "process traced.nested")
    opened = named(spans, "handler work")
    assert len(opened) == (2 if handler is opens_spans_async else 1)
    for span in opened:
        assert span.parent is not None
        assert span.parent.span_id == process.context.span_id
    assert (process.attributes or {})["outbox.outcome"] == "completed"


@pytest.mark.django_db
@pytest.mark.parametrize("concurrency", [1, 2])
@pytest.mark.parametrize("broken", ["receive", "process"])
def test_a_broken_tracer__changes_nothing_the_worker_does(
    spans, breaking, register_handler, concurrency, broken, caplog
) -> None:
    from outbox import tracing
    from outbox.worker import Worker

    ran: list[int] = []
    register_handler("traced.ok", lambda event: ran.append(event.payload["n"]))
    publish_many([NewEvent("traced.ok", {"n": n}) for n in range(5)])
    breaking.broken = broken
    tracing._warned = False
    try:
        result = Worker(worker_id="traced", concurrency=concurrency).run(drain=True)
    finally:
        breaking.broken = ""

    assert (result.claimed, result.completed) == (5, 5)
    assert sorted(ran) == [0, 1, 2, 3, 4]
    assert set(OutboxEvent.objects.values_list("status", flat=True)) == {
        Status.COMPLETED
    }
    warnings = [r for r in caplog.records if "outbox tracing failed" in r.message]
    assert len(warnings) == 1


@pytest.mark.django_db
@pytest.mark.parametrize(
    "stored",
    [
        {"traceparent": 5},
        {"traceparent": "00-" + "f" * 10_000},
        {"traceparent": REMOTE_TRACEPARENT.upper()},
        {"traceparent": REMOTE_TRACEPARENT, "tracestate": "x" * 10_000},
        ["not", "a", "dict"],
    ],
)
def test_drain__a_malformed_stored_context_is_not_followed(
    spans, register_handler, stored
) -> None:
    register_handler("traced.ok", lambda event: None)
    event = publish("traced.ok", {})
    OutboxEvent.objects.filter(pk=event.pk).update(trace_context=stored)

    assert drain().completed == 1

    (process,) = named(spans, "process traced.ok")
    if isinstance(stored, dict) and "tracestate" in stored:
        assert [link.context.span_id for link in process.links] == [0xB7AD6B7169203331]
        assert not process.links[0].context.trace_state
    else:
        assert not process.links


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_worker_process__its_handler_span_links_to_the_publishing_span(
    spans, tmp_path
) -> None:
    with tracer.start_as_current_span("request") as publisher:
        event = publish("outbox_testapp.record", {})
    output = tmp_path / "spans.json"

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.outbox.traced_worker",
            str(output),
            "--drain",
            "--concurrency",
            "2",
            "--worker-id",
            "traced",
        ],
        cwd=worker_process.ROOT,
        env=worker_process.worker_environment(worker_process.test_database_url()),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert OutboxEvent.objects.get(pk=event.pk).status == Status.COMPLETED
    exported = json.loads(output.read_text())
    [receive] = [span for span in exported if span["name"] == "receive outbox"]
    [process] = [
        span for span in exported if span["name"] == "process outbox_testapp.record"
    ]
    published = publisher.get_span_context()
    [link] = process["links"]
    assert link["context"]["trace_id"] == f"0x{published.trace_id:032x}"
    assert link["context"]["span_id"] == f"0x{published.span_id:016x}"
    assert process["parent_id"] == receive["context"]["span_id"]
    assert process["kind"] == "SpanKind.CONSUMER"
    assert process["attributes"]["outbox.event.id"] == event.pk
    assert process["attributes"]["messaging.client.id"] == "traced"
