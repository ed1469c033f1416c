"""OpenTelemetry tracing: from the span that published an event to its handler.

Needs opentelemetry-api (the "tracing" extra); without it every function
here does nothing, and publish() stores NULL. The outbox only uses the API:
the project installs an SDK and sets a TracerProvider (in its settings, or
with opentelemetry-instrument). Until it does, no span is valid: publish()
stores NULL, a claim costs one no-op span and a handler none.

- publish() stores the active span's W3C trace context with each event,
  {"traceparent": ..., "tracestate": ...} in OutboxEvent.trace_context
  (tracestate only when there is one), NULL outside a valid span. It is
  written with the TraceContext propagator itself, never the global one:
  that one also carries baggage, which may hold personal data, and the row
  outlives the request by the retention period.
- The worker records a "receive outbox" span (kind CLIENT, as OpenTelemetry's
  messaging conventions have a pull-based receive) for each claim that took
  events, from the claim's start to its commit, linked to the publishing
  span of each event that has one. Claims that found nothing (every idle
  poll) or rolled back make no span.
- Each handler runs inside a "process <event type>" span (kind CONSUMER),
  a child of its batch's receive span and linked to its publishing span:
  a trace per batch, not one trace from the web request to the email, so
  that a retry a day later does not stretch the publisher's trace. The span
  is the current one while the handler runs, so the spans the handler makes
  (and its database or HTTP instrumentation) nest under it, in the slot's
  thread or, for an async handler, in the event loop async_to_sync runs
  (it copies the context across).
- A failed run's span has status ERROR, described by the error's class
  alone, and one "exception" event with the class and the message redacted
  as the stored error is (outbox.redaction): never the raw message, never
  the traceback, which exporters would send on and tracing backends keep.
  Its outbox.outcome attribute is the run's (completed, retried, failed,
  lost), told before the worker records it: an outcome whose fence then
  matches nothing is lost in the database and not in the span.
"""

import importlib.metadata
import logging
import re
from types import TracebackType
from typing import TYPE_CHECKING, Any

from outbox.models import MESSAGE_LIMIT, error_class_name
from outbox.redaction import redact

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import (
        TraceContextTextMapPropagator,
    )
except ImportError:  # pragma: no cover - the extra is installed in dev
    trace = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from contextvars import Token

    from opentelemetry.context import Context

    from outbox.models import OutboxEvent

logger = logging.getLogger(__name__)

#: The messaging system's name in the spans' attributes.
SYSTEM = "outbox"
#: A W3C traceparent, version 00; anything else stored is not followed.
TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
#: The longest tracestate followed (the W3C limit: 32 members, 512 chars).
TRACESTATE_LIMIT = 512
RECEIVE_SPAN = "receive outbox"
#: Where a claimed event keeps its receive span's context and its
#: publisher's link, for its process span: (Context, Link | None), or
#: _UNTRACED when the claim found no tracer provider set.
_CLAIMED = "_outbox_trace"
_UNTRACED = "untraced"

try:
    _VERSION: str | None = importlib.metadata.version("django-outbox-reference")
except importlib.metadata.PackageNotFoundError:  # run from a checkout
    _VERSION = None

if trace is not None:
    _PROPAGATOR = TraceContextTextMapPropagator()
    # A ProxyTracer until the project sets a provider, then the provider's.
    _tracer = trace.get_tracer("outbox", _VERSION)


def available() -> bool:
    """Whether opentelemetry-api is installed."""
    return trace is not None


def current_context() -> dict[str, str] | None:
    """Return the active span's W3C trace context, or None outside one."""
    if trace is None:
        return None
    try:
        if not trace.get_current_span().get_span_context().is_valid:
            return None
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
    except Exception as error:  # tracing never stops a publish
        _failed(error)
        return None
    return carrier


_warned = False


def _failed(error: Exception) -> None:
    """Log the first failure of the tracing machinery; the work goes on untraced.

    A broken sampler, span processor or exporter of the project's must not
    change what the outbox does: the event is published, claimed, run and
    recorded as it would be without OpenTelemetry.
    """
    global _warned  # once per process: it would repeat for every event
    log = logger.debug if _warned else logger.warning
    _warned = True
    log(
        "outbox tracing failed: %s; the outbox goes on, untraced where it failed",
        type(error).__name__,
        exc_info=True,
    )


def received(claimed: list["OutboxEvent"], *, started: int, worker_id: str) -> None:
    """Record the span of a claim that took events; started: time.time_ns().

    A claim that took none (every idle poll) makes no span.
    """
    if trace is None or not claimed:
        return
    try:
        _receive(claimed, started, worker_id)
    except Exception as error:  # tracing never strands a claimed batch
        _failed(error)
        for event in claimed:
            setattr(event, _CLAIMED, _UNTRACED)


def _receive(claimed: list["OutboxEvent"], started: int, worker_id: str) -> None:
    span = _tracer.start_span(
        RECEIVE_SPAN,
        kind=trace.SpanKind.CLIENT,
        attributes={
            "messaging.system": SYSTEM,
            "messaging.operation.type": "receive",
            "messaging.operation.name": "receive",
            "messaging.batch.message_count": len(claimed),
            "messaging.client.id": worker_id,
        },
        start_time=started,
    )
    if not span.get_span_context().is_valid:
        # No provider is set: no span records, so none is made per event.
        for event in claimed:
            setattr(event, _CLAIMED, _UNTRACED)
        return
    parent = trace.set_span_in_context(span)
    for event in claimed:
        link = _link(event.trace_context)
        if link is not None:
            # Added, not given at the start: parsed only once the span is
            # known to be valid.
            span.add_link(link.context)
        setattr(event, _CLAIMED, (parent, link))
    span.end()


class Processing:
    """The span a handler runs in; current between enter and exit."""

    __slots__ = ("_span", "_token")
    _token: "Token[Context]"

    def __init__(self, event: "OutboxEvent") -> None:
        claimed = getattr(event, _CLAIMED, None)
        if claimed is None:  # not from a traced claim: run_event() on its own
            parent, link = None, _link(event.trace_context)
        else:
            parent, link = claimed
        attributes: dict[str, Any] = {
            "messaging.system": SYSTEM,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": event.event_type,
            "messaging.message.id": str(event.uuid),
            "outbox.event.id": event.pk,
            "outbox.event.type": event.event_type,
            "outbox.event.attempt": event.attempts,
            "outbox.queue": event.queue_name,
        }
        if event.key:
            attributes["outbox.event.key"] = event.key
        if event.subscriber:
            attributes["outbox.subscriber"] = event.subscriber
        if event.locked_by:
            attributes["messaging.client.id"] = event.locked_by
        self._span = _tracer.start_span(
            f"process {event.event_type}",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes=attributes,
            links=[link] if link is not None else None,
            # Both would record the raw message and the traceback.
            record_exception=False,
            set_status_on_exception=False,
        )

    def __enter__(self) -> "Processing":
        self._token = otel_context.attach(trace.set_span_in_context(self._span))
        return self

    def finished(self, outcome: str, error: BaseException | None) -> None:
        """Tell the span how the run ended: its outcome, and its error if any."""
        try:
            self._span.set_attribute("outbox.outcome", outcome)
            if error is not None:
                _record_error(self._span, error)
        except Exception as failure:  # the run's outcome stands
            _failed(failure)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # Only what the run lets out: KeyboardInterrupt, a fault of the
        # worker's own. The handler's errors are outcomes, told by finished().
        try:
            if error is not None:
                _record_error(self._span, error)
        except Exception as failure:
            _failed(failure)
        finally:
            otel_context.detach(self._token)
            try:
                self._span.end()
            except Exception as failure:  # an exporter's, say
                _failed(failure)


class NotProcessing:
    """What processing() returns without OpenTelemetry: nothing, at no cost."""

    __slots__ = ()

    def __enter__(self) -> "NotProcessing":
        return self

    def finished(self, outcome: str, error: BaseException | None) -> None:
        """Nothing to tell."""

    def __exit__(self, *exc_info: object) -> None:
        """Nothing to end."""


_NOT_PROCESSING = NotProcessing()


def processing(event: "OutboxEvent") -> Processing | NotProcessing:
    """Return the span to run event's handler in, as a context manager."""
    if trace is None or getattr(event, _CLAIMED, None) is _UNTRACED:
        return _NOT_PROCESSING
    try:
        return Processing(event)
    except Exception as error:  # the handler runs untraced
        _failed(error)
        return _NOT_PROCESSING


def _link(stored: object) -> "trace.Link | None":
    """The link to the span an event's stored context names, if valid."""
    if not isinstance(stored, dict):
        return None
    traceparent = stored.get("traceparent")
    if not isinstance(traceparent, str) or not TRACEPARENT.fullmatch(traceparent):
        return None
    carrier = {"traceparent": traceparent}
    tracestate = stored.get("tracestate")
    if isinstance(tracestate, str) and 0 < len(tracestate) <= TRACESTATE_LIMIT:
        carrier["tracestate"] = tracestate
    span_context = trace.get_current_span(
        _PROPAGATOR.extract(carrier)
    ).get_span_context()
    return trace.Link(span_context) if span_context.is_valid else None


def _record_error(span: "trace.Span", error: BaseException) -> None:
    """Mark the span failed: the error's class, and its message redacted."""
    name = error_class_name(error)
    span.set_status(trace.Status(trace.StatusCode.ERROR, type(error).__name__))
    span.set_attribute("error.type", name)
    span.add_event(
        "exception",
        {
            "exception.type": name,
            "exception.message": _message(error),
        },
    )


def _message(error: BaseException) -> str:
    """The error's message, redacted and cut as the stored one is."""
    try:
        text = str(error)
    except Exception:  # a broken __str__ must not break the run's end
        return ""
    return redact(text)[:MESSAGE_LIMIT]
