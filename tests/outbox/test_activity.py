"""The workers' activity per minute and the admin's chart of it:
outbox/activity.py, the heartbeat's part in outbox/runner.py, outbox/charts.py."""

import re
from datetime import UTC, datetime, timedelta

import pytest
from django.db import DatabaseError
from django.urls import reverse
from django.utils import timezone

from outbox import activity, publish
from outbox.activity import Minute
from outbox.charts import activity_chart
from outbox.models import OutboxActivity, OutboxEvent
from outbox.runner import Heartbeat
from outbox.worker import Worker
from tests.outbox.worker_process import (
    WorkerProcess,
    nothing_unfinished,
    wait_until,
)

pytestmark = pytest.mark.django_db


@pytest.mark.sqlite
def test_heartbeat__adds_the_workers_counts_and_the_ready_backlog_to_the_minute() -> (
    None
):
    worker = Worker(worker_id="beating")
    heartbeat = Heartbeat(worker)
    for number in range(3):
        publish("test.event", {"n": number})

    worker.activity.add(completed=5, failed=1)
    heartbeat.record_activity()
    worker.activity.add(completed=2, failed=0)
    publish("test.event", {"n": 3})
    heartbeat.record_activity()

    (row,) = OutboxActivity.objects.all()
    # The backlog is counted once a minute: the first beat's count stands.
    assert (row.completed, row.failed, row.ready) == (7, 1, 3)
    assert row.minute.second == row.minute.microsecond == 0
    assert worker.activity.take() == (0, 0)


def test_heartbeat__keeps_the_counts_a_failed_write_could_not_add(
    monkeypatch,
) -> None:
    worker = Worker(worker_id="beating")
    heartbeat = Heartbeat(worker)
    worker.activity.add(completed=4, failed=2)

    def refuse(**_: object) -> None:
        raise DatabaseError("the database is away")

    monkeypatch.setattr(activity, "add_to_minute", refuse)
    with pytest.raises(DatabaseError):
        heartbeat.record_activity()

    assert worker.activity.take() == (4, 2)


def test_heartbeat__a_failed_cleanup_does_not_add_the_counts_twice(
    monkeypatch,
) -> None:
    worker = Worker(worker_id="beating")
    heartbeat = Heartbeat(worker)
    worker.activity.add(completed=10, failed=1)

    def refuse(using: str) -> int:
        raise DatabaseError("statement timeout")

    monkeypatch.setattr(activity, "forget_old", refuse)
    with pytest.raises(DatabaseError):
        heartbeat.record_activity()
    heartbeat.record_activity()  # the next beat

    (row,) = OutboxActivity.objects.all()
    assert (row.completed, row.failed) == (10, 1)


def test_worker__counts_the_events_it_completed_and_failed(register_handler) -> None:
    def handle(event: OutboxEvent) -> None:
        if event.payload["n"] % 3 == 0:
            raise ValueError("every third")

    register_handler("test.counted", handle, max_attempts=1)
    for number in range(9):
        publish("test.counted", {"n": number})
    worker = Worker(worker_id="counting", concurrency=1)

    worker.run(drain=True)

    assert worker.activity.take() == (6, 3)


@pytest.mark.sqlite
def test_forget_old__deletes_rows_older_than_a_day() -> None:
    now = timezone.now().replace(second=0, microsecond=0)
    OutboxActivity.objects.create(minute=now - timedelta(days=2), completed=1)
    OutboxActivity.objects.create(minute=now - timedelta(hours=23), completed=1)

    assert activity.forget_old("default") == 1
    assert OutboxActivity.objects.count() == 1


def test_last_hour__is_sixty_minutes_with_the_empty_ones_filled_in() -> None:
    now = datetime(2026, 12, 4, 18, 30, 42, tzinfo=UTC)
    OutboxActivity.objects.create(
        minute=datetime(2026, 12, 4, 18, 30, tzinfo=UTC), completed=3, ready=9
    )
    OutboxActivity.objects.create(
        minute=datetime(2026, 12, 4, 17, 31, tzinfo=UTC), failed=2
    )
    OutboxActivity.objects.create(  # 61 minutes ago: off the chart
        minute=datetime(2026, 12, 4, 17, 29, tzinfo=UTC), completed=100
    )

    minutes = activity.last_hour(now=now)

    assert len(minutes) == 60
    assert minutes[0] == Minute(
        start=datetime(2026, 12, 4, 17, 31, tzinfo=UTC), failed=2
    )
    assert minutes[-1] == Minute(
        start=datetime(2026, 12, 4, 18, 30, tzinfo=UTC), completed=3, ready=9
    )
    assert sum(minute.completed for minute in minutes) == 3
    assert all(minute.ready is None for minute in minutes[:-1])


def chart_minutes() -> list[Minute]:
    start = datetime(2026, 12, 4, 17, 31, tzinfo=UTC)
    return [
        Minute(
            start=start + timedelta(minutes=offset),
            completed=30 if offset == 10 else 10,
            failed=10 if offset == 10 else 0,
            ready=None if offset in (20, 21) else 5 * offset,
        )
        for offset in range(60)
    ]


def test_chart__scales_bars_to_the_busiest_minute_and_stacks_the_failures() -> None:
    svg = str(activity_chart(chart_minutes()))

    assert svg.startswith('<svg class="outbox-chart" role="img"')
    assert svg.count('class="outbox-chart-minute"') == 60
    heights = [
        (float(done), float(failed))
        for done, failed in re.findall(
            r'class="outbox-chart-completed"[^>]*height="([\d.]+)".*?'
            r'class="outbox-chart-failed"[^>]*height="([\d.]+)"',
            svg,
        )
    ]
    busiest = heights[10]
    assert busiest[0] == pytest.approx(3 * heights[0][0], abs=0.1)
    assert busiest[1] == pytest.approx(heights[0][0], abs=0.1)  # 10 of 40
    assert heights[0][1] == 0.0
    assert "17:41 UTC: 30 completed, 10 failed, 50 ready" in svg
    assert "17:51 UTC: 10 completed, 0 failed, ready not counted" in svg
    assert ">40/min<" in svg
    assert ">295 ready<" in svg


def test_chart__breaks_the_ready_line_where_no_worker_counted() -> None:
    svg = str(activity_chart(chart_minutes()))

    lines = re.findall(r'class="outbox-chart-ready" points="([^"]*)"', svg)
    assert [len(points.split()) for points in lines] == [20, 38]


def test_chart__of_an_idle_hour_draws_empty_bars_and_no_line() -> None:
    start = datetime(2026, 12, 4, 17, 31, tzinfo=UTC)
    svg = str(
        activity_chart([Minute(start=start + timedelta(minutes=n)) for n in range(60)])
    )

    assert "outbox-chart-ready" not in svg
    assert ">0/min<" in svg
    assert 'height="0.0"' in svg


def test_changelist__shows_the_last_hour(viewer) -> None:
    minute = timezone.now().replace(second=0, microsecond=0)
    OutboxActivity.objects.create(minute=minute, completed=12, failed=3, ready=7)

    html = viewer.get(reverse("admin:outbox_outboxevent_changelist")).content.decode()

    assert '<svg class="outbox-chart"' in html
    assert 'data-count="completed-last-hour">12<' in html
    assert 'data-count="failed-last-hour">3<' in html
    assert f"{minute:%H:%M} UTC: 12 completed, 3 failed, 7 ready" in html


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_worker_process__records_what_it_did_in_the_minutes_rows(workers) -> None:
    worker = WorkerProcess("--stuck-timeout-ms", "1500", "--worker-id", "active")
    workers.append(worker)
    worker.wait_for_output("outbox worker started")
    for number in range(25):
        publish("outbox_testapp.record", {"n": number})
    publish("nobody.handles.this", {}, max_attempts=1)
    wait_until(nothing_unfinished, context=lambda: worker.output)

    assert worker.stop() == 0  # its last counts are written as it stops

    rows = OutboxActivity.objects.all()
    assert sum(row.completed for row in rows) == 25
    assert sum(row.failed for row in rows) == 1
    assert rows.exclude(ready=None).exists()
