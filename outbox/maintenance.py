"""The worker's periodic chores, each on its own interval.

- rescue: events whose worker's lease ran out (it died) are retried, or
  failed if their attempts are used up, and their keys move on;
- sweep: keys left with no claimable head (a worker died between finishing
  a head and promoting the next) get one again; it scans the unfinished
  keyed events, so it runs once per lease period;
- recheck: keys a publisher held when their next event was to be promoted
  are promoted once free;
- prune: with OUTBOX_PRUNE_AFTER_DAYS, old completed events are deleted,
  and with OUTBOX_PRUNE_FAILED_AFTER_DAYS failed events that long after they
  failed; a few batches a minute at most.

The worker calls run_due() between claims; a chore that raises is retried
at its next period, not on every tick. drain() runs them too.
"""

import enum
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta

from django.db import DatabaseError, transaction

from outbox import ordering
from outbox.errors import LeaseExpired
from outbox.handling import Backoff, Outcome, failed_run
from outbox.metrics import NoMetrics, WorkerMetrics
from outbox.models import OutboxEvent
from outbox.pruning import prune
from outbox.recording import write_failure

logger = logging.getLogger(__name__)

#: Expired leases rescued per transaction; the rest wait for the next round.
RESCUE_BATCH = 500
#: Longest pause between two rescues, whatever the lease.
RESCUE_EVERY_CAP_SECONDS = 5.0
PRUNE_EVERY_SECONDS = 60.0
PRUNE_BATCH_SIZE = 1000
PRUNE_MAX_BATCHES = 10


class Chore(enum.Enum):
    RESCUE = "rescue"
    SWEEP = "sweep"
    RECHECK = "recheck"
    PRUNE = "prune"


@dataclass
class _Schedule:
    every: float
    due: float = 0.0


class Maintenance:
    """Rescue, sweep, re-check and prune, each when its interval has passed."""

    def __init__(
        self,
        *,
        using: str,
        worker_id: str,
        lease: timedelta,
        backoff: Backoff,
        prune_after_days: int | None,
        prune_failed_after_days: int | None = None,
        metrics: "WorkerMetrics | NoMetrics | None" = None,
    ) -> None:
        self.using = using
        self.metrics = metrics or NoMetrics()
        self.worker_id = worker_id
        self.backoff = backoff
        self.prune_after_days = prune_after_days
        self.prune_failed_after_days = prune_failed_after_days
        #: Lanes to promote once their key's publisher lets go; checked every
        #: tick.
        self.lanes_to_recheck: set[ordering.Lane] = set()
        lease_seconds = lease.total_seconds()
        self._schedules = {
            Chore.RESCUE: _Schedule(min(lease_seconds / 2, RESCUE_EVERY_CAP_SECONDS)),
            Chore.SWEEP: _Schedule(lease_seconds),
            Chore.PRUNE: _Schedule(
                PRUNE_EVERY_SECONDS, time.monotonic() + PRUNE_EVERY_SECONDS
            ),
        }
        self._chores: dict[Chore, Callable[[], int]] = {
            Chore.RESCUE: self.rescue_expired,
            Chore.SWEEP: self.promote_orphaned_keys,
            Chore.PRUNE: self.prune,
        }

    def recheck_later(self, lanes: Iterable[ordering.Lane]) -> None:
        self.lanes_to_recheck.update(lanes)

    def run_due(self) -> list[Chore]:
        """Run every chore whose time has come; return those that ran."""
        now = time.monotonic()
        ran = []
        for chore, schedule in self._schedules.items():
            if now < schedule.due or (chore is Chore.PRUNE and not self.prunes):
                continue
            # Scheduled before it runs: a chore that raises waits its period.
            schedule.due = now + schedule.every
            self._chores[chore]()
            ran.append(chore)
        if self.lanes_to_recheck:
            self.lanes_to_recheck = ordering.recheck(self.lanes_to_recheck, self.using)
            ran.append(Chore.RECHECK)
        return ran

    def rescue_expired(self) -> int:
        """Return events of dead workers to pending, or fail them if used up."""
        finished_lanes: set[ordering.Lane] = set()
        with transaction.atomic(using=self.using):
            expired = list(
                OutboxEvent.objects.using(self.using)
                .expired()
                .order_by("locked_until")
                .select_for_update(skip_locked=True)[:RESCUE_BATCH]
            )
            for event in expired:
                run = failed_run(event, LeaseExpired(event.locked_by), self.backoff)
                outcome = write_failure(run, worker_id=self.worker_id, using=self.using)
                if outcome is Outcome.FAILED and event.key:
                    finished_lanes.add(ordering.lane_of(event))
            if finished_lanes:
                self.recheck_later(ordering.advance(finished_lanes, self.using))
        self.metrics.rescued_leases(len(expired))
        if expired:
            logger.warning(
                "outbox rescued %d events with expired leases",
                len(expired),
                extra={"worker_id": self.worker_id, "rescued": len(expired)},
            )
        return len(expired)

    def promote_orphaned_keys(self) -> int:
        """Give every key with unfinished events a claimable head again."""
        promoted = ordering.promote_orphaned_heads(self.using)
        if promoted:
            logger.warning(
                "outbox promoted %d orphaned key heads",
                promoted,
                extra={"worker_id": self.worker_id, "promoted": promoted},
            )
        return promoted

    @property
    def prunes(self) -> bool:
        """Whether either retention setting is on."""
        return bool(self.prune_after_days or self.prune_failed_after_days)

    def prune(self) -> int:
        """Delete a few batches of old completed and failed events, as set."""
        if not self.prunes:
            return 0
        try:
            result = prune(
                older_than=_days(self.prune_after_days),
                failed_older_than=_days(self.prune_failed_after_days),
                batch_size=PRUNE_BATCH_SIZE,
                max_batches=PRUNE_MAX_BATCHES,
                using=self.using,
            )
        except DatabaseError as error:
            logger.warning(
                "outbox pruning failed: %s; retrying in %gs",
                type(error).__name__,
                PRUNE_EVERY_SECONDS,
                extra={"worker_id": self.worker_id},
            )
            return 0
        return result.total


def _days(days: int | None) -> timedelta | None:
    return timedelta(days=days) if days else None
