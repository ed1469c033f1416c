"""The long-running worker process around Worker: loop, signals, heartbeat.

run_outbox_worker is a thin shell around Runner, and Runner around
Worker.run(), the loop drain() shares. Runner adds what a process needs: the
stop signals, a heartbeat thread (this worker is alive; the leases of every
event it holds are extended), and a Waiter, so an idle loop sleeps until a
NOTIFY (PostgreSQL) or the poll interval. The loop survives its environment:
a turn that raises is logged and retried with backoff, and a lost database
connection is replaced on the next turn.

Stopping (SIGTERM or SIGINT): claiming stops, the handlers in flight finish,
claimed events not started are released without charging an attempt, the
connections close and run() returns 0. A second signal, or a handler still
running after shutdown_timeout, ends the process at once with a non-zero
status; the leases then cover the events it held.

Connections: the worker's own (claims, outcomes, chores), the heartbeat's,
the listener's, and with --concurrency N > 1 one per slot: N + 3 at most.
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
from types import FrameType

from django.db import DatabaseError, connections
from django.db.models.functions import Now

from outbox import activity
from outbox.metrics import WorkerMetrics
from outbox.models import OutboxEvent, OutboxWorker
from outbox.monitoring import heartbeat_interval
from outbox.recording import BatchResult
from outbox.wakeup import Waiter
from outbox.worker import Worker

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: How often a heartbeat deletes activity rows past activity.KEEP.
FORGET_EVERY_SECONDS = 60.0


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
        self.heartbeat = Heartbeat(worker)
        self.total = BatchResult()
        self._stopping = threading.Event()
        self._shutdown_timer: threading.Timer | None = None

    def run(self) -> int:
        """Loop until stopped, drained or max_events; return the exit status."""
        with self._signal_handlers():
            self._log_start()
            self.waiter.start()
            self.heartbeat.start()
            try:
                self.total = self.worker.run(
                    drain=self.options.drain,
                    max_events=self.options.max_events,
                    poll_seconds=self.options.poll_ms / 1000,
                    wakeup=self.waiter,
                    survive_errors=True,
                )
            finally:
                self._stopping.set()
                self.heartbeat.stop()
                self.heartbeat.flush_activity()
                self.heartbeat.unregister()
                self.waiter.close()
                if isinstance(self.worker.metrics, WorkerMetrics):
                    self.worker.metrics.close()
                connections.close_all()
                if self._shutdown_timer is not None:
                    self._shutdown_timer.cancel()  # stopped in time
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
        """Stop claiming; let the handlers in flight finish; return from run()."""
        self._stopping.set()
        self.worker.stop()
        self.waiter.interrupt()

    def _log_start(self) -> None:
        try:
            self.heartbeat.register()
        except DatabaseError as error:
            logger.warning(
                "outbox could not register the worker: %s", type(error).__name__
            )
        settings = self.worker.settings
        logger.info(
            "outbox worker started: id=%s pid=%d queues=%s concurrency=%d "
            "batch_size=%d poll_ms=%d "
            "stuck_timeout_ms=%d max_attempts=%d backoff_ms=%d..%d listen=%s "
            "drain=%s max_events=%s shutdown_timeout_s=%g",
            self.worker.worker_id,
            os.getpid(),
            ",".join(self.worker.queues) or "*",
            self.worker.concurrency,
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
            "outbox worker stopping on %s: finishing the handlers in flight "
            "(press Ctrl+C again to force)",
            name,
        )
        self.stop()
        self._shutdown_timer = threading.Timer(
            self.options.shutdown_timeout, self._shutdown_timed_out
        )
        self._shutdown_timer.daemon = True
        self._shutdown_timer.start()

    def _shutdown_timed_out(self) -> None:
        logger.error(
            "outbox handler still running after the %gs shutdown timeout: exiting; "
            "its lease covers the events it held",
            self.options.shutdown_timeout,
        )
        os._exit(1)


class Heartbeat:
    """A thread that says the worker is alive and keeps its leases.

    Every heartbeat_interval() (a third of the lease, 10 s at most) it
    records the worker in OutboxWorker, extends the lease of every event the
    worker holds (Leases.extend()) and adds what the worker recorded to the
    minute's activity (outbox.activity), on a connection of its own.
    """

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.every = heartbeat_interval(worker.lease).total_seconds()
        self._stopping = threading.Event()
        self._forget_at = 0.0  # at the first beat, then once a minute
        self._thread = threading.Thread(
            target=self._beat, name="outbox-heartbeat", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop beating; return once the thread has closed its connection."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(self.every + 1)

    def beat(self) -> None:
        """Record the worker as alive and extend its leases, once; add its
        activity to the minute's; read the backlog's gauges when metrics are
        on."""
        self.register()
        self.worker.leases.extend()
        self.worker.metrics.read_backlog(self.worker.using)
        self.record_activity()

    def record_activity(self) -> None:
        """Add what the worker recorded since the last beat to this minute's row.

        Counts a failed write could not add wait for the next beat.
        """
        completed, failed = self.worker.activity.take()
        using = self.worker.using
        try:
            counted = activity.ready_counted(using)
            ready = None if counted else activity.count_ready(using)
            activity.add_to_minute(
                using=using, completed=completed, failed=failed, ready=ready
            )
        except DatabaseError:
            self.worker.activity.add(completed=completed, failed=failed)
            raise
        if time.monotonic() >= self._forget_at:
            # After the counts are in: a failure here must not add them twice.
            self._forget_at = time.monotonic() + FORGET_EVERY_SECONDS
            activity.forget_old(using)

    def flush_activity(self) -> None:
        """Record the activity since the last beat, as the worker stops."""
        try:
            self.record_activity()
        except DatabaseError as error:
            logger.warning(
                "outbox could not record the worker's last activity: %s",
                type(error).__name__,
                extra={"worker_id": self.worker.worker_id},
            )

    def register(self) -> None:
        OutboxWorker.objects.using(self.worker.using).update_or_create(
            worker_id=self.worker.worker_id,
            defaults={
                "hostname": socket.gethostname(),
                "pid": os.getpid(),
                "last_seen_at": Now(),
            },
        )

    def unregister(self) -> None:
        try:
            OutboxWorker.objects.using(self.worker.using).filter(
                worker_id=self.worker.worker_id
            ).delete()
        except DatabaseError:
            logger.warning(
                "outbox could not unregister worker %s", self.worker.worker_id
            )

    def _beat(self) -> None:
        while not self._stopping.wait(self.every):
            try:
                self.beat()
            except DatabaseError as error:
                logger.warning(
                    "outbox heartbeat failed: %s",
                    type(error).__name__,
                    extra={"worker_id": self.worker.worker_id},
                )
                connections[self.worker.using].close()
        connections[self.worker.using].close()
