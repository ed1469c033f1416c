"""Monitoring: outbox/monitoring.py and the outbox_status command."""

import json
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import override_settings
from django.utils import timezone

from outbox import monitoring
from outbox.models import OutboxEvent
from outbox.monitoring import collect_status, count_by_status, heartbeat_interval
from outbox.operations import discard_events
from tests.outbox.factories import OutboxEventFactory, OutboxWorkerFactory

pytestmark = pytest.mark.django_db


def make_lagging(seconds: float) -> OutboxEvent:
    return OutboxEventFactory.create(
        available_at=timezone.now() - timedelta(seconds=seconds)
    )


def status_of(*arguments: str) -> tuple[str, int]:
    """Run outbox_status; return its output and exit status."""
    out = StringIO()
    try:
        call_command("outbox_status", *arguments, stdout=out)
    except CommandError as error:
        return out.getvalue() + str(error), error.returncode
    return out.getvalue(), 0


@pytest.mark.sqlite
def test_heartbeat_interval__is_a_third_of_the_lease_at_most_ten_seconds() -> None:
    assert heartbeat_interval(timedelta(seconds=60)) == timedelta(seconds=10)
    assert heartbeat_interval(timedelta(seconds=3)) == timedelta(seconds=1)


@pytest.mark.sqlite
def test_count_by_status__counts_each_status() -> None:
    OutboxEventFactory.create_batch(3)
    OutboxEventFactory.create(leased=True)
    failed = OutboxEventFactory.create_batch(2, failed=True)
    discard_events([failed[0].pk], actor="ops")
    OutboxEventFactory.create(completed=True)

    counts = count_by_status()

    assert (counts.pending, counts.processing, counts.completed) == (3, 1, 1)
    assert (counts.failed, counts.discarded, counts.failed_not_discarded) == (2, 1, 1)
    assert counts.completed_exact


def test_count_by_status__estimates_completed_events_past_the_cap(
    monkeypatch,
) -> None:
    monkeypatch.setattr(monitoring, "COUNT_CAP", 2)
    OutboxEventFactory.create_batch(7, completed=True)
    OutboxEventFactory.create()
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE outbox_outboxevent")

    counts = count_by_status()

    assert not counts.completed_exact
    assert counts.completed == 7  # 8 rows in the statistics, 1 of them pending


@pytest.mark.sqlite
def test_collect_status__measures_the_lag_of_the_oldest_ready_event() -> None:
    make_lagging(30)
    make_lagging(5)
    OutboxEventFactory.create(available_at=timezone.now() + timedelta(hours=1))

    lag = collect_status().lag

    assert lag is not None
    assert timedelta(seconds=30) <= lag < timedelta(seconds=90)


@pytest.mark.sqlite
def test_collect_status__has_no_lag_when_nothing_is_ready() -> None:
    OutboxEventFactory.create(completed=True)
    OutboxEventFactory.create(failed=True)
    OutboxEventFactory.create(leased=True, key="org:1")
    OutboxEventFactory.create(key="org:1", waiting=True)  # behind the leased head
    OutboxEventFactory.create(available_at=timezone.now() + timedelta(hours=1))

    assert collect_status().lag is None


@pytest.mark.sqlite
def test_collect_status__tells_live_workers_from_dead_ones() -> None:
    OutboxWorkerFactory.create(worker_id="alive")
    OutboxWorkerFactory.create(
        worker_id="dead", last_seen_at=timezone.now() - timedelta(minutes=5)
    )

    with override_settings(OUTBOX={"STUCK_TIMEOUT_MS": 60_000}):
        status = collect_status()

    assert {worker.worker_id: worker.alive for worker in status.workers} == {
        "alive": True,
        "dead": False,
    }
    assert status.live_workers == 1


@pytest.mark.sqlite
def test_command__prints_counts_lag_and_workers() -> None:
    make_lagging(12)
    OutboxEventFactory.create(failed=True)
    OutboxWorkerFactory.create(worker_id="web-1-42")

    output, code = status_of()

    assert code == 0
    assert "pending     1" in output
    assert "failed      1 (0 discarded)" in output
    assert "lag         1" in output
    assert "workers     1 live" in output
    assert "web-1-42" in output and "alive" in output


@pytest.mark.sqlite
def test_command__prints_json() -> None:
    OutboxEventFactory.create(failed=True)
    OutboxWorkerFactory.create(worker_id="web-1-42")

    output, code = status_of("--json")

    data = json.loads(output)
    assert code == 0
    assert data["counts"] == {
        "pending": 0,
        "processing": 0,
        "failed": 1,
        "completed": 0,
    }
    assert data["lag_seconds"] is None
    assert data["completed_is_estimate"] is False
    assert data["live_workers"] == 1
    assert data["workers"][0]["worker_id"] == "web-1-42"


@pytest.mark.sqlite
def test_command__exits_2_when_the_lag_exceeds_the_threshold() -> None:
    make_lagging(120)

    output, code = status_of("--fail-if-lag", "60")

    assert code == 2
    assert "more than --fail-if-lag 60" in output
    assert status_of("--fail-if-lag", "600")[1] == 0


@pytest.mark.sqlite
def test_command__exits_2_when_failed_events_reach_the_threshold() -> None:
    events = OutboxEventFactory.create_batch(2, failed=True)

    output, code = status_of("--fail-if-failed", "2")

    assert code == 2
    assert "2 failed events (not discarded) reach --fail-if-failed 2" in output
    discard_events([events[0].pk], actor="ops")
    assert status_of("--fail-if-failed", "2")[1] == 0


@pytest.mark.sqlite
@pytest.mark.parametrize(
    ("arguments", "option"),
    [
        (["--fail-if-lag", "soon"], "--fail-if-lag"),
        (["--fail-if-failed", "0"], "--fail-if-failed"),
    ],
)
def test_command__names_the_option_it_cannot_read(arguments, option) -> None:
    with pytest.raises(CommandError, match=option):
        call_command("outbox_status", *arguments)
