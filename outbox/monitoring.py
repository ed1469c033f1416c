"""Read-only views of the outbox for operators: counts, lag, live workers.

Every query here stays cheap on a table of millions of completed events: the
unfinished and failed events are counted through the partial index
outbox_status_idx, and completed events, the bulk, are counted exactly only up
to COUNT_CAP and estimated from PostgreSQL's statistics beyond it.
"""

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db import connections, router
from django.db.models import Count, Exists, Max, Min, OuterRef, Q
from django.db.models.functions import Coalesce, Now

from outbox import statements
from outbox.causes import split_cause
from outbox.conf import get_settings
from outbox.models import OPEN_TO_OPERATORS, OutboxEvent, OutboxWorker, Status

#: Completed events counted exactly; beyond this, the count is an estimate.
COUNT_CAP = 10_000
#: A worker is alive while its last heartbeat is this many intervals old or less.
LIVE_AFTER_HEARTBEATS = 3
#: Groups of failed events shown, the largest first.
GROUP_LIMIT = 100
#: Keys with a retrying head shown, the oldest heads first.
HELD_KEY_LIMIT = 100
#: Events counted behind each held key; past it, the page says "more than".
HELD_COUNT_CAP = 10_000


@dataclass(frozen=True)
class StatusCounts:
    pending: int
    processing: int
    failed: int
    discarded: int
    completed: int
    #: False when completed is an estimate (more than COUNT_CAP rows).
    completed_exact: bool
    #: subscriber ("" the unnamed handlers) -> pending, processing and failed
    #: deliveries (failed counting discarded ones too).
    by_subscriber: dict[str, dict[str, int]] = field(
        default_factory=dict, compare=False
    )

    @property
    def failed_not_discarded(self) -> int:
        return self.failed - self.discarded


@dataclass(frozen=True)
class WorkerState:
    worker_id: str
    hostname: str
    pid: int
    started_at: datetime
    last_seen_at: datetime
    alive: bool


@dataclass(frozen=True)
class OutboxStatus:
    counts: StatusCounts
    #: Age of the oldest event that is ready but not claimed, if any.
    lag: timedelta | None
    workers: list[WorkerState]

    @property
    def live_workers(self) -> int:
        return sum(worker.alive for worker in self.workers)

    def as_dict(self) -> dict[str, Any]:
        """Return the status as JSON-ready values."""
        counts = self.counts
        return {
            "counts": {
                "pending": counts.pending,
                "processing": counts.processing,
                "failed": counts.failed,
                "completed": counts.completed,
            },
            "completed_is_estimate": not counts.completed_exact,
            "failed": counts.failed,
            "discarded": counts.discarded,
            "failed_not_discarded": counts.failed_not_discarded,
            "subscribers": counts.by_subscriber,
            "lag_seconds": None if self.lag is None else self.lag.total_seconds(),
            "live_workers": self.live_workers,
            "workers": [
                {
                    "worker_id": worker.worker_id,
                    "hostname": worker.hostname,
                    "pid": worker.pid,
                    "started_at": worker.started_at.isoformat(),
                    "last_seen_at": worker.last_seen_at.isoformat(),
                    "alive": worker.alive,
                }
                for worker in self.workers
            ],
        }


def heartbeat_interval(lease: timedelta) -> timedelta:
    """Return how often a worker with this lease refreshes its heartbeat."""
    return timedelta(seconds=max(min(lease.total_seconds() / 3, 10.0), 0.05))


def stale_after() -> timedelta:
    """Return how old a heartbeat may be before its worker counts as dead."""
    lease = timedelta(milliseconds=get_settings().stuck_timeout_ms)
    return heartbeat_interval(lease) * LIVE_AFTER_HEARTBEATS


def count_by_status(*, using: str | None = None) -> StatusCounts:
    """Count events per status, estimating completed ones past COUNT_CAP."""
    using = using or router.db_for_read(OutboxEvent)
    events = OutboxEvent.objects.using(using)
    rows = (
        events.filter(status__in=OPEN_TO_OPERATORS)
        .order_by()
        .values("status", "subscriber")
        .annotate(
            total=Count("id"),
            discarded=Count("id", filter=Q(discarded_at__isnull=False)),
        )
    )
    totals: dict[str, tuple[int, int]] = {}
    by_subscriber: dict[str, dict[str, int]] = {}
    with statements.in_index_order(using):
        for row in rows:
            total, discarded = totals.get(row["status"], (0, 0))
            totals[row["status"]] = (total + row["total"], discarded + row["discarded"])
            counts = by_subscriber.setdefault(
                row["subscriber"],
                {status.value: 0 for status in OPEN_TO_OPERATORS},
            )
            counts[row["status"]] = row["total"]
        completed = events.filter(status=Status.COMPLETED)[: COUNT_CAP + 1].count()
    open_total = sum(total for total, _ in totals.values())
    exact = completed <= COUNT_CAP
    if not exact:
        completed = max(_estimated_rows(using) - open_total, COUNT_CAP + 1)
    return StatusCounts(
        pending=totals.get(Status.PENDING, (0, 0))[0],
        processing=totals.get(Status.PROCESSING, (0, 0))[0],
        failed=totals.get(Status.FAILED, (0, 0))[0],
        discarded=totals.get(Status.FAILED, (0, 0))[1],
        completed=completed,
        completed_exact=exact,
        by_subscriber=dict(sorted(by_subscriber.items())),
    )


def ready_lag(*, using: str | None = None) -> timedelta | None:
    """Return how long the oldest ready, unclaimed event has waited, if any."""
    using = using or router.db_for_read(OutboxEvent)
    with statements.in_index_order(using):
        oldest = (
            OutboxEvent.objects.using(using)
            .ready()
            .annotate(now=Now())
            .values_list("available_at", "now")
            .first()
        )
    if oldest is None:
        return None
    available_at, now = oldest
    return max(now - available_at, timedelta(0))


def worker_states(*, using: str | None = None) -> list[WorkerState]:
    """Return every registered worker, alive or not (by its last heartbeat)."""
    using = using or router.db_for_read(OutboxWorker)
    oldest_alive = stale_after()
    workers = (
        OutboxWorker.objects.using(using)
        .annotate(now=Now())
        .values_list(
            "worker_id", "hostname", "pid", "started_at", "last_seen_at", "now"
        )
        .order_by("worker_id")
    )
    return [
        WorkerState(
            worker_id=worker_id,
            hostname=hostname,
            pid=pid,
            started_at=started_at,
            last_seen_at=last_seen_at,
            alive=now - last_seen_at <= oldest_alive,
        )
        for worker_id, hostname, pid, started_at, last_seen_at, now in workers
    ]


def collect_status(*, using: str | None = None) -> OutboxStatus:
    """Return counts per status, the lag and the workers."""
    return OutboxStatus(
        counts=count_by_status(using=using),
        lag=ready_lag(using=using),
        workers=worker_states(using=using),
    )


@dataclass(frozen=True)
class FailureGroup:
    """Failed deliveries of one event type, subscriber and cause (outbox.causes)."""

    event_type: str
    subscriber: str
    cause: str
    count: int
    first_failed_at: datetime | None
    last_failed_at: datetime | None

    @property
    def error_class(self) -> str:
        return split_cause(self.cause)[0]

    @property
    def message(self) -> str:
        return split_cause(self.cause)[1]


def failure_groups(
    *, using: str | None = None, limit: int = GROUP_LIMIT
) -> list[FailureGroup]:
    """Group the failed deliveries not discarded by event type, subscriber and
    cause, largest first.

    One GROUP BY over the failed rows (outbox_status_idx finds them); events
    that failed before failed_at existed are dated by their creation.
    """
    using = using or router.db_for_read(OutboxEvent)
    failed_at = Coalesce("failed_at", "created_at")
    rows = (
        OutboxEvent.objects.using(using)
        .filter(status=Status.FAILED, discarded_at__isnull=True)
        .values("event_type", "subscriber", "error_cause")
        # Count("*"): counting ids would read the rows, not the index alone.
        .annotate(count=Count("*"), first=Min(failed_at), last=Max(failed_at))
        .order_by("-count", "event_type", "subscriber", "error_cause")
    )
    return [
        FailureGroup(
            event_type=row["event_type"],
            subscriber=row["subscriber"],
            cause=row["error_cause"],
            count=row["count"],
            first_failed_at=row["first"],
            last_failed_at=row["last"],
        )
        for row in rows[:limit]
    ]


@dataclass(frozen=True)
class HeldKey:
    """A key's lane whose head failed an attempt and waits for its retry,
    holding back the lane's later events."""

    key: str
    head: OutboxEvent
    #: The events waiting behind it, counted up to HELD_COUNT_CAP + 1.
    waiting: int

    @property
    def waiting_capped(self) -> bool:
        return self.waiting > HELD_COUNT_CAP


def held_keys(
    *, using: str | None = None, limit: int = HELD_KEY_LIMIT
) -> list[HeldKey]:
    """Return the lanes held back behind a retrying head, most events held first.

    A head that failed for good releases its lane (the next event becomes
    claimable), so only a head still to be retried holds events back. The
    heads come from outbox_retrying_head_idx, only those with an event
    behind them; each count reads outbox_lane_unfinished_idx, and stops
    past HELD_COUNT_CAP.
    """
    using = using or router.db_for_read(OutboxEvent)
    events = OutboxEvent.objects.using(using)
    waiting = events.filter(status=Status.PENDING, waiting=True)
    behind = waiting.filter(key=OuterRef("key"), subscriber=OuterRef("subscriber"))
    heads = list(
        events.filter(status=Status.PENDING, waiting=False)
        .exclude(key="")
        .exclude(last_error="")
        .filter(Exists(behind))
        .only(
            "uuid",
            "event_type",
            "subscriber",
            "key",
            "attempts",
            "max_attempts",
            "available_at",
            "error_cause",
            "last_error",
        )
        .order_by("id")[:limit]
    )
    held = [
        HeldKey(
            key=head.key,
            head=head,
            waiting=waiting.filter(key=head.key, subscriber=head.subscriber)[
                : HELD_COUNT_CAP + 1
            ].count(),
        )
        for head in heads
    ]
    return sorted(held, key=lambda entry: (-entry.waiting, entry.head.pk))


def _estimated_rows(using: str) -> int:
    """Return PostgreSQL's estimate of the events table's rows, or 0."""
    connection = connections[using]
    if connection.vendor != "postgresql":
        return 0
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass",
            [OutboxEvent._meta.db_table],
        )
        row = cursor.fetchone()
    return max(int(row[0]), 0) if row else 0
