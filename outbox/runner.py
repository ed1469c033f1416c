"""The long-running worker process around Worker: loop, signals, heartbeat.

run_outbox_worker is a thin shell around Runner. The loop claims batches
while there is work, then waits for a NOTIFY (PostgreSQL) or the poll interval.
It survives its environment: a tick that raises is logged and retried with
backoff, and a lost database connection is replaced on the next tick.

Stopping (SIGTERM or SIGINT): claiming stops, the handler in flight finishes,
the batch's unstarted events are released without charging an attempt, the
connections close and run() returns 0. A second signal, or a handler still
running after shutdown_timeout, ends the process at once with a non-zero
status; the lease then covers the events it held.
"""

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from types import FrameType

from django.db import DatabaseError, connections, transaction
from django.db.models.functions import Now

from outbox.models import OutboxEvent, OutboxWorker, Status
from outbox.monitoring import heartbeat_interval
from outbox.pruning import prune
from outbox.wakeup import Waiter
from outbox.worker import BatchResult, Worker

logger = logging.getLogger(__name__)

#: Longest pause after a tick that raised (the database is down, say).
ERROR_BACKOFF_CAP_SECONDS = 5.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: Scheduled pruning (OUTBOX_PRUNE_AFTER_DAYS): how often, and how much at most.
PRUNE_EVERY_SECONDS = 60.0
PRUNE_BATCH_SIZE = 1000
PRUNE_MAX_BATCHES = 10


@dataclass(frozen=True)
class RunOptions:
    poll_ms: int
    drain: bool = False
    max_events: int | None = None
    shutdown_timeout: float = 30.0
    listen: bool = True


class Runner:
    """Run a Worker until told to stop."""

    def __init__(self, worker: Worker, options: RunOptions) -> None:
        self.worker = worker
        self.options = options
        self.waiter = Waiter(
            using=worker.using,
            channel=OutboxEvent._meta.db_table,
            listen=options.listen,
            name=worker.worker_id,
        )
        self.total = BatchResult()
        self._stopping = threading.Event()
        self._heartbeat_every = heartbeat_interval(worker.lease).total_seconds()
        self._next_prune = time.monotonic() + PRUNE_EVERY_SECONDS

    def run(self) -> int:
        """Loop until stopped, drained or max_events; return the exit status."""
        with self._signal_handlers():
            self._log_start()
            self.waiter.start()
            heartbeat = threading.Thread(
                target=self._beat, name="outbox-heartbeat", daemon=True
            )
            heartbeat.start()
            try:
                self._loop()
            finally:
                self._release_claimed_ahead()
                self._stopping.set()
                heartbeat.join(self._heartbeat_every + 1)
                self._unregister()
                self.waiter.close()
                connections.close_all()
        logger.info(
            "outbox worker stopped cleanly: claimed=%d completed=%d retried=%d "
            "failed=%d released=%d",
            self.total.claimed,
            self.total.completed,
            self.total.retried,
            self.total.failed,
            self.total.released,
            extra={"worker_id": self.worker.worker_id, **vars(self.total)},
        )
        return 0

    def stop(self) -> None:
        """Stop claiming; finish the handler in flight; return from run()."""
        self._stopping.set()
        self.worker.stop_requested.set()
        self.waiter.interrupt()

    def _loop(self) -> None:
        error_delay = 0.0
        while not self._stopping.is_set():
            try:
                result = self._tick()
            except Exception:
                error_delay = min(max(error_delay * 2, 0.1), ERROR_BACKOFF_CAP_SECONDS)
                logger.exception(
                    "outbox tick failed; retrying in %.1fs",
                    error_delay,
                    extra={"worker_id": self.worker.worker_id},
                )
                self._discard_broken_connection()
                self.waiter.wait(error_delay)
                continue
            error_delay = 0.0
            if result.claimed:
                if self._reached_max_events():
                    return
                continue
            if self.options.drain:
                logger.info("outbox drained: no event is ready")
                return
            logger.debug("outbox idle: waiting up to %d ms", self.options.poll_ms)
            self.waiter.wait(self.options.poll_ms / 1000)

    def _tick(self) -> BatchResult:
        remaining = self._remaining_events()
        if remaining is not None:
            self.worker.batch_size = min(self.worker.batch_size, remaining)
        result = self.worker.run_once()
        self.total += result
        if (
            self.worker.settings.prune_after_days
            and time.monotonic() >= self._next_prune
            # Never while a batch claimed ahead waits for its handlers.
            and not self.worker.holds_claimed_ahead
        ):
            self._prune(self.worker.settings.prune_after_days)
        return result

    def _prune(self, days: int) -> None:
        """Delete a few batches of old completed events, once a minute at most.

        Out of the claim path: one clock read per tick decides, and a prune
        that fails is retried only at the next period, not on every tick.
        """
        self._next_prune = time.monotonic() + PRUNE_EVERY_SECONDS
        prune(
            older_than=timedelta(days=days),
            batch_size=PRUNE_BATCH_SIZE,
            max_batches=PRUNE_MAX_BATCHES,
            using=self.worker.using,
        )

    def _remaining_events(self) -> int | None:
        if self.options.max_events is None:
            return None
        return max(self.options.max_events - self.total.claimed, 0)

    def _reached_max_events(self) -> bool:
        if self._remaining_events() == 0:
            logger.info(
                "outbox handled --max-events=%d events", self.options.max_events
            )
            return True
        return False

    def _release_claimed_ahead(self) -> None:
        try:
            released = self.worker.release_claimed_ahead()
        except DatabaseError as error:
            logger.warning(
                "outbox could not release the batch claimed ahead (%s); its "
                "lease will expire",
                type(error).__name__,
            )
            return
        self.total.released += released

    def _discard_broken_connection(self) -> None:
        """Close the claiming connection, so the next tick opens a new one."""
        connection = connections[self.worker.using]
        if not connection.in_atomic_block:
            connection.close()

    def _beat(self) -> None:
        """Record this worker as alive, every few seconds, on its own connection."""
        while not self._stopping.wait(self._heartbeat_every):
            try:
                self._register()
                self._extend_leases()
            except DatabaseError as error:
                logger.warning(
                    "outbox heartbeat failed: %s",
                    type(error).__name__,
                    extra={"worker_id": self.worker.worker_id},
                )
                connections[self.worker.using].close()
        connections[self.worker.using].close()

    def _extend_leases(self) -> None:
        """Push back the leases of the batches this worker holds.

        Only batches it will still record outcomes for (held_tokens): a batch
        lost with a failed transaction must lapse, so the rescue hands it on.
        Events inside the outcome transaction are locked by it (and so safe
        from rescue); SKIP LOCKED leaves them alone rather than wait for them.
        """
        tokens = self.worker.held_tokens
        if not tokens:
            return
        held = OutboxEvent.objects.using(self.worker.using).filter(
            status=Status.PROCESSING, lease_token__in=tokens
        )
        with transaction.atomic(using=self.worker.using):
            ids = list(
                held.select_for_update(skip_locked=True).values_list("pk", flat=True)
            )
            if ids:
                held.filter(pk__in=ids).update(locked_until=self.worker.lease_end())

    def _register(self) -> None:
        OutboxWorker.objects.using(self.worker.using).update_or_create(
            worker_id=self.worker.worker_id,
            defaults={
                "hostname": socket.gethostname(),
                "pid": os.getpid(),
                "last_seen_at": Now(),
            },
        )

    def _unregister(self) -> None:
        try:
            OutboxWorker.objects.using(self.worker.using).filter(
                worker_id=self.worker.worker_id
            ).delete()
        except DatabaseError:
            logger.warning(
                "outbox could not unregister worker %s", self.worker.worker_id
            )

    def _log_start(self) -> None:
        try:
            self._register()
        except DatabaseError as error:
            logger.warning(
                "outbox could not register the worker: %s", type(error).__name__
            )
        settings = self.worker.settings
        logger.info(
            "outbox worker started: id=%s pid=%d batch_size=%d poll_ms=%d "
            "stuck_timeout_ms=%d max_attempts=%d backoff_ms=%d..%d listen=%s "
            "drain=%s max_events=%s shutdown_timeout_s=%g",
            self.worker.worker_id,
            os.getpid(),
            self.worker.batch_size,
            self.options.poll_ms,
            self.worker.lease.total_seconds() * 1000,
            settings.max_attempts,
            settings.backoff_base_ms,
            settings.backoff_cap_ms,
            self.waiter.listen,
            self.options.drain,
            self.options.max_events,
            self.options.shutdown_timeout,
            extra={"worker_id": self.worker.worker_id},
        )

    @contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        """Install the stop handlers; restore the previous ones afterwards."""
        previous = {number: signal.getsignal(number) for number in STOP_SIGNALS}
        for number in STOP_SIGNALS:
            signal.signal(number, self._on_signal)
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def _on_signal(self, number: int, frame: FrameType | None) -> None:
        name = signal.Signals(number).name
        if self._stopping.is_set():
            logger.warning("outbox received %s again: exiting at once", name)
            os._exit(128 + number)
        logger.info(
            "outbox worker stopping on %s: finishing the handler in flight "
            "(press Ctrl+C again to force)",
            name,
        )
        self.stop()
        timer = threading.Timer(self.options.shutdown_timeout, self._shutdown_timed_out)
        timer.daemon = True
        timer.start()

    def _shutdown_timed_out(self) -> None:
        logger.error(
            "outbox handler still running after the %gs shutdown timeout: exiting; "
            "its lease covers the events it held",
            self.options.shutdown_timeout,
        )
        os._exit(1)
