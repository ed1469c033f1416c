"""Prometheus metrics: a worker's (--metrics-port), and publish()'s (a view).

Needs prometheus-client (the "metrics" extra). The worker serves /metrics
from a thread of its own, on its own registry:

- outbox_events_total{event_type, outcome}: the outcomes it recorded
  (completed, retried, failed, released, lost);
- outbox_handler_duration_seconds{event_type}: each run of a handler;
- outbox_claim_lag_seconds: when a claim took an event, minus when it
  became available (the database's clock for both), waiting behind an
  earlier event of its key included;
- outbox_batch_duration_seconds: each turn that recorded or claimed;
- outbox_in_flight: events claimed and not yet recorded;
- outbox_leases_rescued_total: events this worker rescued from dead ones;
- outbox_ready_events, outbox_failed_events (counted up to COUNT_CAP) and
  outbox_oldest_ready_age_seconds: read by the heartbeat thread, on its own
  connection, once per heartbeat (10 s at most).

The web process's side, publish() counted per event type and its refusals
per error class, is metrics_view(), for a project to mount; it asks for
the bearer token OUTBOX_METRICS_TOKEN and is off (404) without one.

Labels stay bounded: an event type is its own label value when a handler
is registered for it, or for the first TASK_LABELS task paths; any other
shares the value "other", so a producer cannot grow the series without end.
"""

import logging
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from outbox import registry

try:
    import prometheus_client
except ImportError:  # pragma: no cover - the extra is installed in dev
    prometheus_client = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

#: Event types that share one label value.
OTHER = "other"
#: Distinct task paths given a label value of their own, per process.
TASK_LABELS = 200
#: The longest label value: an event type's column holds 200 characters.
LABEL_LIMIT = 200
#: (event type, outcome) pairs whose series are looked up once.
SERIES_CACHE = 2000
#: Ready and failed events are counted up to this many; beyond, this + 1.
COUNT_CAP = 100_000
#: Buckets of the handler and batch histograms, in seconds: 1 ms to 1 min.
DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
#: Buckets of the claim lag, in seconds: 1 ms to 10 min.
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 600.0)


def available() -> bool:
    """Whether prometheus-client is installed."""
    return prometheus_client is not None


class EventTypeLabels:
    """The label value of each event type, bounded (see the module's doc)."""

    def __init__(self, task_labels: int = TASK_LABELS) -> None:
        self._task_labels = task_labels
        self._tasks: set[str] = set()

    def __call__(self, event_type: str) -> str:
        if len(event_type) > LABEL_LIMIT:
            return OTHER  # no event holds it (a refused one, say)
        if event_type.startswith(registry.TASK_EVENT_PREFIX):
            if event_type in self._tasks:
                return event_type
            if len(self._tasks) < self._task_labels:
                self._tasks.add(event_type)
                return event_type
            return OTHER
        if registry.is_registered(event_type):
            return event_type
        return OTHER


class WorkerMetrics:
    """The worker's metrics, on a registry of their own."""

    def __init__(self) -> None:
        if prometheus_client is None:
            raise RuntimeError(
                "Worker metrics need prometheus-client: pip install "
                "'django-outbox-reference[metrics]' (or prometheus-client)."
            )
        p = prometheus_client
        self.registry = p.CollectorRegistry()
        self.label = EventTypeLabels()
        self.events = p.Counter(
            "outbox_events_total",
            "Outcomes the worker recorded, by event type and outcome.",
            ["event_type", "outcome"],
            registry=self.registry,
        )
        self.handler_duration = p.Histogram(
            "outbox_handler_duration_seconds",
            "How long each run of a handler took.",
            ["event_type"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.claim_lag = p.Histogram(
            "outbox_claim_lag_seconds",
            "When a claim took an event, minus when it became available.",
            buckets=LAG_BUCKETS,
            registry=self.registry,
        )
        self.batch_duration = p.Histogram(
            "outbox_batch_duration_seconds",
            "How long each turn that recorded or claimed events took.",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = p.Gauge(
            "outbox_in_flight",
            "Events claimed and not yet recorded.",
            registry=self.registry,
        )
        self.rescued = p.Counter(
            "outbox_leases_rescued",
            "Events this worker rescued from workers whose lease expired.",
            registry=self.registry,
        )
        self.ready = p.Gauge(
            "outbox_ready_events",
            f"Events ready to claim (counted up to {COUNT_CAP:,}).",
            registry=self.registry,
        )
        self.failed = p.Gauge(
            "outbox_failed_events",
            f"Failed events not discarded (counted up to {COUNT_CAP:,}).",
            registry=self.registry,
        )
        self.oldest_ready_age = p.Gauge(
            "outbox_oldest_ready_age_seconds",
            "How long the oldest ready event has waited to be claimed.",
            registry=self.registry,
        )
        self._server: Any = None
        self._cached: dict[tuple[str, str], tuple[Any, Any]] = {}

    # -- what the worker tells ------------------------------------------------

    def recorded(self, runs: Iterable[Any]) -> None:
        """Count the outcomes of a turn's runs and time their handlers."""
        for run in runs:
            counter, timer = self._series(run.event.event_type, run.outcome.value)
            counter.inc()
            if run.duration is not None:
                timer.observe(run.duration)

    def _series(self, event_type: str, outcome: str) -> tuple[Any, Any]:
        """The counter and the histogram of a type and an outcome, looked up
        once: labels() takes a lock and builds a key for every call."""
        key = (event_type, outcome)
        found = self._cached.get(key)
        if found is None:
            label = self.label(event_type)
            found = (
                self.events.labels(label, outcome),
                self.handler_duration.labels(label),
            )
            if len(self._cached) < SERIES_CACHE:
                self._cached[key] = found
        return found

    def claimed(self, events: Iterable[Any]) -> None:
        for event in events:
            if event.last_attempted_at is not None:
                lag = event.last_attempted_at - event.available_at
                self.claim_lag.observe(max(lag.total_seconds(), 0.0))

    def turn(self, seconds: float, held: int) -> None:
        self.batch_duration.observe(seconds)
        self.in_flight.set(held)

    def rescued_leases(self, count: int) -> None:
        if count:
            self.rescued.inc(count)

    def read_backlog(self, using: str) -> None:
        """Set the backlog gauges from three index reads (the heartbeat's)."""
        from outbox import activity, monitoring, statements
        from outbox.models import OutboxEvent, Status

        events = OutboxEvent.objects.using(using)
        try:
            ready = activity.count_ready(using, cap=COUNT_CAP)
            with statements.in_index_order(using):
                failed_events = events.filter(
                    status=Status.FAILED, discarded_at__isnull=True
                )
                failed = failed_events[: COUNT_CAP + 1].count()
            lag = monitoring.ready_lag(using=using) or timedelta(0)
        except Exception as error:  # the heartbeat's other work goes on
            logger.warning(
                "outbox metrics could not read the backlog: %s; the gauges "
                "keep their last values",
                type(error).__name__,
            )
            return
        self.ready.set(ready)
        self.failed.set(failed)
        self.oldest_ready_age.set(lag.total_seconds())

    # -- serving -------------------------------------------------------------

    def serve(self, port: int, address: str = "0.0.0.0") -> int:  # noqa: S104
        """Serve /metrics on port (0: any free one), every interface; return it."""
        assert prometheus_client is not None  # noqa: S101 - checked in __init__
        server, _thread = prometheus_client.start_http_server(
            port, addr=address, registry=self.registry
        )
        self._server = server
        return int(server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class NoMetrics:
    """What the worker tells when metrics are off: nothing, at no cost."""

    def recorded(self, runs: Iterable[Any]) -> None:
        """Nothing to count."""

    def claimed(self, events: Iterable[Any]) -> None:
        """Nothing to observe."""

    def turn(self, seconds: float, held: int) -> None:
        """Nothing to time."""

    def rescued_leases(self, count: int) -> None:
        """Nothing to count."""

    def read_backlog(self, using: str) -> None:
        """Nothing to read."""


# -- the web process's side: publish() --------------------------------------


class PublishMetrics:
    """What publish() and publish_many() count, on a registry of their own."""

    def __init__(self) -> None:
        assert prometheus_client is not None  # noqa: S101 - callers check
        p = prometheus_client
        self.registry = p.CollectorRegistry()
        self.label = EventTypeLabels()
        self.published = p.Counter(
            "outbox_published",
            "Events written by publish() (their transaction may yet roll back).",
            ["event_type"],
            registry=self.registry,
        )
        self.refused = p.Counter(
            "outbox_publish_errors",
            "Calls of publish() refused before writing, by error class.",
            ["event_type", "error"],
            registry=self.registry,
        )
        self._cached: dict[str, Any] = {}

    def wrote(self, event_type: str) -> None:
        counter = self._cached.get(event_type)
        if counter is None:
            counter = self.published.labels(self.label(event_type))
            if len(self._cached) < SERIES_CACHE:
                self._cached[event_type] = counter
        counter.inc()

    def failed(self, event_type: object, error: BaseException) -> None:
        label = self.label(event_type) if isinstance(event_type, str) else OTHER
        self.refused.labels(label, type(error).__name__).inc()


_publish_metrics: PublishMetrics | None = None


def publish_metrics() -> PublishMetrics | None:
    """The process's publish() metrics; None without prometheus-client."""
    global _publish_metrics  # one per process, made on first use
    if _publish_metrics is None and prometheus_client is not None:
        _publish_metrics = PublishMetrics()
    return _publish_metrics


def metrics_view(request: Any) -> Any:
    """Serve this process's publish() metrics to a scraper with the token.

    Mount it where the scraper reaches it, e.g. in urls.py:
    path("outbox/metrics", metrics_view). It answers 404 while
    OUTBOX_METRICS_TOKEN is unset, and 403 without the right
    "Authorization: Bearer <token>"; GET and HEAD only.
    """
    import hmac

    from django.http import Http404, HttpResponse, HttpResponseNotAllowed
    from django.http.response import HttpResponseForbidden

    from outbox.conf import get_settings

    token = get_settings().metrics_token
    collected = publish_metrics()
    if not token or collected is None:
        raise Http404("The outbox's metrics view is off.")
    if request.method not in ("GET", "HEAD"):
        return HttpResponseNotAllowed(["GET", "HEAD"])
    sent = request.headers.get("Authorization", "")
    expected = f"Bearer {token}"
    if not hmac.compare_digest(sent.encode(), expected.encode()):
        return HttpResponseForbidden("A bearer token is needed.")
    assert prometheus_client is not None  # noqa: S101 - collected is not None
    return HttpResponse(
        prometheus_client.generate_latest(collected.registry),
        content_type=prometheus_client.CONTENT_TYPE_LATEST,
    )
