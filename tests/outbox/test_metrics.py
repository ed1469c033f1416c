"""Prometheus metrics of a worker (outbox/metrics.py)."""

import socket
import urllib.request
from collections.abc import Iterator

import pytest
from django.core.management import CommandError, call_command
from django.test import override_settings

from outbox import publish
from outbox.checks import check_outbox_settings
from outbox.metrics import OTHER, EventTypeLabels, WorkerMetrics
from outbox.models import OutboxEvent, Status
from outbox.worker import Worker
from tests.outbox.worker_process import (
    WorkerProcess,
    nothing_unfinished,
    wait_until,
)


def sample(metrics: WorkerMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.mark.sqlite
@pytest.mark.django_db
def test_worker__counts_outcomes_and_times_handlers_and_claims(
    register_handler,
) -> None:
    register_handler("metered.ok", lambda event: None)

    def fails(event: OutboxEvent) -> None:
        raise ConnectionError("down")

    register_handler("metered.fails", fails)
    for _ in range(5):
        publish("metered.ok", {})
    publish("metered.fails", {}, max_attempts=1)
    metrics = WorkerMetrics()

    Worker(worker_id="m", metrics=metrics).run(drain=True)

    completed = {"event_type": "metered.ok", "outcome": "completed"}
    assert sample(metrics, "outbox_events_total", **completed) == 5
    assert (
        sample(
            metrics,
            "outbox_events_total",
            event_type="metered.fails",
            outcome="failed",
        )
        == 1
    )
    assert (
        sample(
            metrics, "outbox_handler_duration_seconds_count", event_type="metered.ok"
        )
        == 5
    )
    assert sample(metrics, "outbox_claim_lag_seconds_count") == 6
    assert sample(metrics, "outbox_batch_duration_seconds_count") >= 2
    assert sample(metrics, "outbox_in_flight") == 0


@pytest.mark.sqlite
@pytest.mark.django_db
def test_worker__unknown_event_types_share_one_label(register_handler) -> None:
    for number in range(20):
        publish(f"nobody.handles.{number}", {}, max_attempts=1)
    metrics = WorkerMetrics()

    Worker(worker_id="m", metrics=metrics).run(drain=True)

    assert (
        sample(metrics, "outbox_events_total", event_type=OTHER, outcome="failed") == 20
    )
    families = {
        sample.labels.get("event_type")
        for family in metrics.registry.collect()
        if family.name == "outbox_events"
        for sample in family.samples
    }
    assert families == {OTHER}


def test_labels__task_paths_are_their_own_up_to_a_cap() -> None:
    label = EventTypeLabels(task_labels=2)

    assert label("task:a.one") == "task:a.one"
    assert label("task:a.two") == "task:a.two"
    assert label("task:a.three") == OTHER
    assert label("task:a.one") == "task:a.one"
    assert label("never.registered") == OTHER


@pytest.mark.django_db
def test_worker__rescued_leases_are_counted(register_handler) -> None:
    from datetime import timedelta

    from django.utils import timezone

    register_handler("metered.ok", lambda event: None)
    event = publish("metered.ok", {})
    OutboxEvent.objects.filter(pk=event.pk).update(
        status=Status.PROCESSING,
        attempts=1,
        locked_by="dead",
        lease_token=1,
        locked_until=timezone.now() - timedelta(minutes=1),
    )
    metrics = WorkerMetrics()

    assert Worker(worker_id="m", metrics=metrics).rescue_expired() == 1

    assert sample(metrics, "outbox_leases_rescued_total") == 1


@pytest.mark.django_db
def test_backlog_gauges__read_ready_failed_and_the_oldest_age(register_handler):
    for _ in range(3):
        publish("metered.ok", {})
    failed = publish("metered.ok", {})
    OutboxEvent.objects.filter(pk=failed.pk).update(status=Status.FAILED)
    metrics = WorkerMetrics()

    metrics.read_backlog("default")

    assert sample(metrics, "outbox_ready_events") == 3
    assert sample(metrics, "outbox_failed_events") == 1
    assert sample(metrics, "outbox_oldest_ready_age_seconds") >= 0


def test_metrics_port__is_checked() -> None:
    with override_settings(OUTBOX={"METRICS_PORT": 70000}):
        [error] = check_outbox_settings()

    assert error.id == "outbox.E002"
    assert "OUTBOX_METRICS_PORT" in error.msg


@pytest.mark.django_db
def test_command__refuses_a_port_past_65535() -> None:
    with pytest.raises(CommandError, match="not a port"):
        call_command("run_outbox_worker", "--metrics-port", "70000", "--drain")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def metered_worker() -> Iterator[tuple[WorkerProcess, int]]:
    port = free_port()
    worker = WorkerProcess(
        "--metrics-port",
        str(port),
        "--stuck-timeout-ms",
        "1500",
        "--worker-id",
        "metered",
    )
    yield worker, port
    worker.kill()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as got:
        return got.read().decode()


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_worker_process__serves_counters_that_rise_with_what_it_handled(
    metered_worker,
) -> None:
    worker, port = metered_worker
    worker.wait_for_output(f"outbox worker metrics on port {port}")
    before = scrape(port)
    for number in range(25):
        publish("outbox_testapp.record", {"n": number})
    publish("nobody.handles.this", {}, max_attempts=1)

    wait_until(nothing_unfinished, context=lambda: worker.output)
    line = 'outbox_events_total{event_type="outbox_testapp.record",outcome="completed"}'
    wait_until(lambda: f"{line} 25.0" in scrape(port), context=lambda: scrape(port))
    after = scrape(port)

    assert line not in before
    assert 'outbox_events_total{event_type="other",outcome="failed"} 1.0' in after
    assert "nobody.handles.this" not in after
    assert (
        'outbox_handler_duration_seconds_count{event_type="outbox_testapp.record"} '
        "25.0" in after
    )
    # The heartbeat (every 0.5 s here) reads the backlog's gauges.
    wait_until(
        lambda: "outbox_failed_events 1.0" in scrape(port),
        context=lambda: scrape(port),
    )
    assert "outbox_ready_events 0.0" in scrape(port)
    assert worker.stop() == 0


# -- the web process's side ---------------------------------------------------


TOKEN = "t" * 32


def published(event_type: str) -> float:
    from outbox.metrics import publish_metrics

    counted = publish_metrics()
    assert counted is not None
    value = counted.registry.get_sample_value(
        "outbox_published_total", {"event_type": event_type}
    )
    return value or 0.0


@pytest.mark.sqlite
@pytest.mark.django_db
def test_publish__counts_what_it_wrote_and_what_it_refused(register_handler) -> None:
    from outbox import NewEvent, publish_many
    from outbox.metrics import publish_metrics

    register_handler("metered.ok", lambda event: None)
    before = published("metered.ok")
    counted = publish_metrics()
    assert counted is not None
    refused = (
        "outbox_publish_errors_total",
        {"event_type": "metered.ok", "error": "TypeError"},
    )
    refused_before = counted.registry.get_sample_value(*refused) or 0.0

    publish("metered.ok", {})
    publish_many([NewEvent("metered.ok", {}), NewEvent("metered.ok", {})])
    with pytest.raises(TypeError):
        publish("metered.ok", {"not": object()})

    assert published("metered.ok") == before + 3
    assert (counted.registry.get_sample_value(*refused) or 0.0) == refused_before + 1


def call_view(method: str = "get", authorization: str | None = None) -> object:
    from django.test import RequestFactory

    from outbox.metrics import metrics_view

    headers = {"Authorization": authorization} if authorization else {}
    request = getattr(RequestFactory(), method)("/outbox/metrics", headers=headers)
    return metrics_view(request)


def test_metrics_view__is_off_without_a_token() -> None:
    from django.http import Http404

    with pytest.raises(Http404):
        call_view(authorization=f"Bearer {TOKEN}")


@override_settings(OUTBOX={"METRICS_TOKEN": TOKEN})
@pytest.mark.parametrize(
    ("method", "authorization", "status"),
    [
        ("get", None, 403),
        ("get", "Bearer " + "x" * 32, 403),
        ("get", f"Bearer {TOKEN}", 200),
        ("head", f"Bearer {TOKEN}", 200),
        ("post", f"Bearer {TOKEN}", 405),
    ],
)
def test_metrics_view__serves_publish_counters_to_the_token_only(
    method: str, authorization: str | None, status: int
) -> None:
    response = call_view(method, authorization)

    assert response.status_code == status  # type: ignore[attr-defined]
    if status == 200 and method == "get":
        assert b"outbox_published_total" in response.content  # type: ignore[attr-defined]


def test_metrics_token__a_short_one_fails_the_check() -> None:
    with override_settings(OUTBOX={"METRICS_TOKEN": "short"}):
        [error] = check_outbox_settings()

    assert "OUTBOX_METRICS_TOKEN" in error.msg


def test_labels__an_event_type_no_column_holds_is_other() -> None:
    label = EventTypeLabels()

    assert label("task:" + "x" * 300) == OTHER


@pytest.mark.django_db
def test_command__a_metrics_port_in_use_is_a_command_error() -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))  # noqa: S104 - as the worker binds
        taken.listen()
        port = taken.getsockname()[1]

        with pytest.raises(CommandError, match=f"--metrics-port {port}: "):
            call_command("run_outbox_worker", "--metrics-port", str(port), "--drain")


def test_backlog_gauges__a_failed_read_keeps_the_last_values(monkeypatch) -> None:
    metrics = WorkerMetrics()
    metrics.ready.set(7)

    def down(using: str) -> None:
        raise RuntimeError("the database went away")

    monkeypatch.setattr("outbox.statements.in_index_order", down)
    metrics.read_backlog("default")

    assert sample(metrics, "outbox_ready_events") == 7
