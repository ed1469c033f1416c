"""The worker: claim ready events, run their handlers in slots, record outcomes.

Worker.run() is the one loop, shared by run_outbox_worker (through
runner.Runner, which adds signals, the heartbeat and LISTEN/NOTIFY) and by
outbox.testing.drain(). Each turn of it:

1. collects the runs its slots finished (slots.py, handling.py);
2. runs the maintenance chores that are due (maintenance.py);
3. in one short transaction, records their outcomes (recording.py) and
   claims as many ready events as slots are free
   (OutboxEvent.objects.claim()): one commit per turn, however many events;
4. starts the claimed events in the free slots.

With one slot, step 4 runs the batch's handlers right there, one after
another, and the next turn records them and claims the next batch. With N
slots, handlers run in N threads and each turn records whatever finished.

Events with a non-empty key run one at a time in publish order: only the
earliest unfinished event of a key is claimable, and finishing it promotes
the next (ordering.py).
"""

import logging
import threading
import time
from collections.abc import Callable, Collection
from contextlib import nullcontext
from datetime import timedelta
from functools import partial
from typing import Protocol

from django.db import connections, router, transaction

from outbox import tracing
from outbox.activity import ActivityCounter
from outbox.conf import (
    OutboxSettings,
    check_queue_name,
    check_worker_id,
    get_settings,
)
from outbox.handling import Backoff, Run, run_event
from outbox.leases import Leases
from outbox.maintenance import Maintenance
from outbox.metrics import NoMetrics, WorkerMetrics
from outbox.models import Batch, OutboxEvent
from outbox.recording import BatchResult, record
from outbox.redaction import RedactTracebacks
from outbox.slots import InlineSlots, ThreadedSlots

logger = logging.getLogger(__name__)
# Its tracebacks can quote a database error's DETAIL line or an address.
logger.addFilter(RedactTracebacks())

#: Pause between turns while every slot has an event queued: a turn (one
#: commit) then records several outcomes instead of one.
COALESCE_SECONDS = 0.002
#: Longest pause after a turn that raised (the database is down, say).
ERROR_BACKOFF_CAP_SECONDS = 5.0

__all__ = ["BatchResult", "Worker"]


class Wakeup(Protocol):
    """What the loop sleeps on: a Waiter (LISTEN/NOTIFY) or a plain event."""

    def wait(self, timeout: float) -> bool: ...

    def interrupt(self) -> None: ...


class _ThreadWakeup:
    """Sleep until interrupted or timed out: for runs without a Waiter."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def wait(self, timeout: float) -> bool:
        woken = self._event.wait(timeout)
        self._event.clear()
        return woken

    def interrupt(self) -> None:
        self._event.set()


class Worker:
    """Claims events, runs their handlers, records the outcomes."""

    def __init__(
        self,
        *,
        worker_id: str | None = None,
        batch_size: int | None = None,
        stuck_timeout_ms: int | None = None,
        concurrency: int | None = None,
        queues: Collection[str] = (),
        settings: OutboxSettings | None = None,
        metrics: "WorkerMetrics | NoMetrics | None" = None,
    ) -> None:
        self.settings = settings or get_settings()
        # Refused here, not by the first claim, which would fail writing it.
        self.worker_id = check_worker_id(
            worker_id or self.settings.default_worker_id, name="worker_id"
        )
        #: The queues whose events it claims; empty: every queue.
        self.queues = tuple(
            sorted({check_queue_name(name, name="queues") for name in queues})
        )
        self.batch_size = batch_size or self.settings.batch_size
        self.concurrency = concurrency or self.settings.concurrency
        self.lease = timedelta(
            milliseconds=stuck_timeout_ms or self.settings.stuck_timeout_ms
        )
        self.using = router.db_for_write(OutboxEvent)
        #: Set to stop: no more claims; what runs finishes; the rest is released.
        self.stop_requested = threading.Event()
        self.backoff = Backoff(
            self.settings.backoff_base_ms, self.settings.backoff_cap_ms
        )
        self.leases = Leases(using=self.using, duration=self.lease)
        #: What the loop tells of its work (outbox.metrics); nothing by default.
        self.metrics = metrics or NoMetrics()
        #: What it completed and failed since the heartbeat last took them.
        self.activity = ActivityCounter()
        self.maintenance = Maintenance(
            using=self.using,
            worker_id=self.worker_id,
            lease=self.lease,
            backoff=self.backoff,
            prune_after_days=self.settings.prune_after_days,
            prune_failed_after_days=self.settings.prune_failed_after_days,
            metrics=self.metrics,
        )

    def stop(self) -> None:
        """Stop claiming; let the handlers running finish; then run() returns."""
        self.stop_requested.set()

    # -- the loop ------------------------------------------------------------

    def run(
        self,
        *,
        drain: bool = False,
        max_events: int | None = None,
        poll_seconds: float | None = None,
        wakeup: Wakeup | None = None,
        survive_errors: bool = False,
    ) -> BatchResult:
        """Loop until stopped, drained or max_events claimed; return the totals.

        drain: return once no event is ready and none is running.
        survive_errors: log a turn that raised and try again with backoff
        (the command); otherwise raise (drain()).
        """
        wakeup = wakeup or _ThreadWakeup()
        poll = (
            poll_seconds if poll_seconds is not None else self.settings.poll_ms / 1000
        )
        slots = self._open_slots(wakeup.interrupt)
        total = BatchResult()
        finished: list[Run] = []
        error_delay = 0.0
        try:
            while True:
                try:
                    if self.stop_requested.is_set():
                        slots.release_queued()
                    finished += slots.collect()
                    room = self._room(slots.free, max_events, total)
                    batch, result = self._turn(finished, room)
                except Exception:
                    if not survive_errors:
                        raise
                    if self.stop_requested.is_set() and not slots.in_flight:
                        self._log_unrecorded(finished)
                        return total
                    error_delay = min(
                        max(error_delay * 2, 0.1), ERROR_BACKOFF_CAP_SECONDS
                    )
                    logger.exception(
                        "outbox tick failed; retrying in %.1fs",
                        error_delay,
                        extra={"worker_id": self.worker_id},
                    )
                    self._discard_broken_connection()
                    wakeup.wait(error_delay)
                    continue
                error_delay = 0.0
                recorded, finished = finished, []
                total += result
                self._refresh_connection()
                slots.start(batch.events)
                # After the start: metrics stay off the claim-to-handler path.
                self._measure(recorded, batch, result)
                if batch or result.finished:
                    if slots.queued:
                        # Every slot is busy and has its next event: let a
                        # few more finish, so a turn records many at once.
                        time.sleep(COALESCE_SECONDS)
                    continue
                if slots.in_flight:
                    wakeup.wait(poll)  # a slot's end interrupts it
                    continue
                if self._done(drain, max_events, total):
                    return total
                logger.debug("outbox idle: waiting up to %d ms", poll * 1000)
                wakeup.wait(poll)
        finally:
            slots.release_queued()  # raised out: no slot starts them now
            slots.close()

    def _open_slots(self, on_finish: Callable[[], None]) -> InlineSlots | ThreadedSlots:
        if self.concurrency == 1:
            return self._inline_slots()
        return ThreadedSlots(
            self.concurrency,
            execute=partial(run_event, using=self.using, backoff=self.backoff),
            leases=self.leases,
            using=self.using,
            stopping=self.stop_requested,
            on_finish=on_finish,
        )

    def _inline_slots(self) -> InlineSlots:
        return InlineSlots(
            execute=partial(run_event, using=self.using, backoff=self.backoff),
            leases=self.leases,
            using=self.using,
            stopping=self.stop_requested,
            batch_size=self.batch_size,
        )

    def _room(self, free: int, max_events: int | None, total: BatchResult) -> int:
        """How many events the next claim may take."""
        if self.stop_requested.is_set():
            return 0
        room = min(free, self.batch_size)
        if max_events is not None:
            room = min(room, max_events - total.claimed)
        return max(room, 0)

    def _done(self, drain: bool, max_events: int | None, total: BatchResult) -> bool:
        if self.stop_requested.is_set():
            return True
        if max_events is not None and total.claimed >= max_events:
            logger.info("outbox handled --max-events=%d events", max_events)
            return True
        if drain:
            logger.info("outbox drained: no event is ready")
            return True
        return False

    def _turn(self, finished: list[Run], room: int) -> tuple[Batch, BatchResult]:
        """Run due chores; record finished runs and claim, in one transaction."""
        self.maintenance.run_due()
        if not finished and not room:
            return Batch(events=[], token=0), BatchResult()
        started = time.monotonic()
        # With nothing to record, the claim opens its own transaction: BEGIN,
        # the planner settings, the claim, COMMIT (statements.in_index_order).
        with transaction.atomic(using=self.using) if finished else nullcontext():
            recorded = record(finished, using=self.using, worker_id=self.worker_id)
            claim_started = time.time_ns()
            batch = self._claim(room) if room else Batch(events=[], token=0)
        self.leases.drop(run.event for run in finished)
        self.leases.hold(batch.events, claimed_at=started)
        # Once committed (a claim that rolled back took nothing) and held.
        tracing.received(batch.events, started=claim_started, worker_id=self.worker_id)
        self.maintenance.recheck_later(recorded.lanes_to_recheck)
        result = recorded.result
        result.claimed = len(batch)
        result.seconds = time.monotonic() - started
        if finished:
            self._log_turn(result, started)
        return batch, result

    def _measure(self, recorded: list[Run], batch: Batch, result: BatchResult) -> None:
        """Tell the metrics of a turn: what it recorded, claimed, and took."""
        if not recorded and not batch:
            return
        self.activity.add(completed=result.completed, failed=result.failed)
        self.metrics.recorded(recorded)
        self.metrics.claimed(batch.events)
        self.metrics.turn(result.seconds, len(self.leases))

    def _claim(self, limit: int) -> Batch:
        return OutboxEvent.objects.using(self.using).claim(
            worker_id=self.worker_id, limit=limit, lease=self.lease, queues=self.queues
        )

    # -- one batch at a time, in the caller's thread (tests) -------------------

    def claim(self, limit: int | None = None) -> Batch:
        """Claim up to limit (default: batch_size) ready events."""
        claim_started = time.time_ns()
        batch = self._claim(limit or self.batch_size)
        self.leases.hold(batch.events)
        tracing.received(batch.events, started=claim_started, worker_id=self.worker_id)
        return batch

    def process(self, batch: Batch) -> BatchResult:
        """Run a claimed batch's handlers here, one by one, and record them."""
        slots = self._inline_slots()
        slots.start(batch.events)
        finished = slots.collect()
        _, result = self._turn(finished, 0)
        self._measure(finished, Batch(events=[], token=0), result)
        result.claimed = len(batch)
        return result

    def run_once(self) -> BatchResult:
        """Run due chores, then claim one batch and handle it here."""
        self.maintenance.run_due()
        return self.process(self.claim())

    def rescue_expired(self) -> int:
        """Return events of dead workers to pending, or fail them if used up."""
        return self.maintenance.rescue_expired()

    def promote_orphaned_keys(self) -> int:
        """Give every key with unfinished events a claimable head again."""
        return self.maintenance.promote_orphaned_keys()

    # -- helpers ---------------------------------------------------------------

    def _refresh_connection(self) -> None:
        """Replace the worker's connection if broken or past CONN_MAX_AGE."""
        connection = connections[self.using]
        if not connection.in_atomic_block:
            connection.close_if_unusable_or_obsolete()

    def _discard_broken_connection(self) -> None:
        """Close the worker's connection, so the next turn opens a new one."""
        connection = connections[self.using]
        if not connection.in_atomic_block:
            connection.close()

    def _log_unrecorded(self, runs: list[Run]) -> None:
        logger.warning(
            "outbox could not record %d outcomes while stopping; their leases "
            "will expire",
            len(runs),
            extra={"worker_id": self.worker_id},
        )

    def _log_turn(self, result: BatchResult, started: float) -> None:
        if not logger.isEnabledFor(logging.INFO):
            return
        logger.info(
            "outbox turn completed=%d retried=%d failed=%d released=%d lost=%d "
            "claimed=%d duration_ms=%.1f",
            result.completed,
            result.retried,
            result.failed,
            result.released,
            result.lost,
            result.claimed,
            (time.monotonic() - started) * 1000,
            extra={"worker_id": self.worker_id, **vars(result)},
        )
