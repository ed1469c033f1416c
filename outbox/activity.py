"""What the workers did, minute by minute: the admin's chart of the last hour.

The events table cannot tell it cheaply: completed events carry no index on
completed_at (every completion would write to it) and the pruner deletes
them. So each worker counts the events it completed and failed
(ActivityCounter), and its heartbeat adds those counts, with the ready
backlog it counted, to the current minute's OutboxActivity row: one upsert
per heartbeat (10 s at most), on the heartbeat's own connection, by the
database's clock, so workers on hosts with skewed clocks add to the same
minute. The ready backlog is counted once a minute, by the first worker to
find the minute's row without it, not by every worker at every beat. Rows
older than KEEP are deleted as the minutes turn.

last_hour() reads the rows back for the admin (outbox/charts.py draws them).
"""

import threading
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import connections, router
from django.db.models.functions import Now
from django.utils import timezone

from outbox.models import OutboxActivity, OutboxEvent

#: Minutes shown by the admin's chart.
MINUTES = 60
#: Rows kept: a day, so an operator can still read this morning's.
KEEP = timedelta(days=1)
#: Ready events counted per heartbeat, at most (index-only, on the partial
#: index of ready events); beyond, this + 1.
READY_CAP = 100_000


class ActivityCounter:
    """The events a worker recorded as completed and failed since its last beat.

    The worker's loop adds; the heartbeat thread takes. A stop between the
    two loses at most one heartbeat's counts from a chart.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._completed = 0
        self._failed = 0

    def add(self, *, completed: int, failed: int) -> None:
        if completed or failed:
            with self._lock:
                self._completed += completed
                self._failed += failed

    def take(self) -> tuple[int, int]:
        """Return the counts since the last take, and start again from zero."""
        with self._lock:
            counts = (self._completed, self._failed)
            self._completed = self._failed = 0
        return counts


def count_ready(using: str, *, cap: int = READY_CAP) -> int:
    """Count the ready events, up to cap + 1 (the chart's and the metrics')."""
    from outbox import statements

    with statements.in_index_order(using):
        return OutboxEvent.objects.using(using).ready()[: cap + 1].count()


def ready_counted(using: str) -> bool:
    """Whether the current minute's row has its ready count already."""
    connection = connections[using]
    table = connection.ops.quote_name(OutboxActivity._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT 1 FROM {table} WHERE minute = {_minute(using)}"  # noqa: S608 - names
            " AND ready IS NOT NULL",
            [],  # no values, but given: the %% of SQLite's format become %
        )
        return cursor.fetchone() is not None


def add_to_minute(
    *, using: str, completed: int, failed: int, ready: int | None
) -> None:
    """Add counts to the current minute's row, by the database's clock.

    ready: the backlog counted now, or None to keep the minute's.
    """
    connection = connections[using]
    table = connection.ops.quote_name(OutboxActivity._meta.db_table)
    minute = _minute(using)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (minute, completed, failed, ready)"  # noqa: S608 - names, not values
            f" VALUES ({minute}, %s, %s, %s)"
            f" ON CONFLICT (minute) DO UPDATE SET"
            f" completed = {table}.completed + excluded.completed,"
            f" failed = {table}.failed + excluded.failed,"
            f" ready = COALESCE(excluded.ready, {table}.ready)",
            [completed, failed, ready],
        )


def _minute(using: str) -> str:
    """The current minute by the database's clock, as SQL."""
    if connections[using].vendor == "postgresql":
        return "date_trunc('minute', now())"
    # SQLite stores datetimes as UTC text in this format; %% for the cursor.
    return "strftime('%%Y-%%m-%%d %%H:%%M:00', 'now')"


def forget_old(using: str) -> int:
    """Delete the rows older than KEEP; return how many."""
    old = OutboxActivity.objects.using(using).filter(minute__lt=Now() - KEEP)
    deleted, _ = old.delete()
    return deleted


@dataclass(frozen=True)
class Minute:
    """One minute of the chart; ready is None when no worker counted it."""

    start: datetime
    completed: int = 0
    failed: int = 0
    ready: int | None = None


def last_hour(*, using: str | None = None, now: datetime | None = None) -> list[Minute]:
    """Return the last MINUTES minutes, oldest first, the current one last.

    Minutes no worker recorded are there, empty, so the chart's axis is time.
    """
    end = (now or timezone.now()).replace(second=0, microsecond=0)
    start = end - timedelta(minutes=MINUTES - 1)
    using = using or router.db_for_read(OutboxActivity)
    rows = OutboxActivity.objects.using(using).filter(minute__gte=start)
    found = {row.minute: row for row in rows}
    minutes = []
    for offset in range(MINUTES):
        at = start + timedelta(minutes=offset)
        row = found.get(at)
        minutes.append(
            Minute(start=at)
            if row is None
            else Minute(
                start=at, completed=row.completed, failed=row.failed, ready=row.ready
            )
        )
    return minutes
