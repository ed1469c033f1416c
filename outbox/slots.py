"""Where handlers run: in the worker's own thread, or in N slot threads.

A worker hands the events it claimed to its slots and later collects the
finished runs. InlineSlots (concurrency 1, SQLite, drain()) runs each event
at once in the caller's thread, on the caller's connection: that is what lets
drain() work inside a test's transaction. ThreadedSlots runs up to N at once,
one thread per slot, each thread with its own database connection (Django
gives each thread its own), so a handler's writes and its completed mark
share the slot's transaction. A handler that hangs holds its slot only.

Threaded slots keep up to 2N claimed events queued beside the N running, so
a slot that finishes starts its next event at once instead of waiting for
the worker's next claim. Two per slot, not one: a turn (record, claim,
commit) takes a few milliseconds, and slots whose handlers end faster than
that (a broker's acknowledgement) emptied a queue of one each before the
turn ended, then waited for it (measured with the JetStream relay at
concurrency 16: a turn recorded about N events, against about 1.4N with two
queued, and the relay was 10-15 % faster). Queued events are held under lease
like running ones, and given back uncharged (RELEASED) when the worker
stops.
"""

import logging
import queue
import threading
from collections.abc import Callable

from django.db import DatabaseError, connections

from outbox import relays
from outbox.handling import Outcome, Run
from outbox.leases import Leases
from outbox.models import OutboxEvent
from outbox.redaction import RedactTracebacks

logger = logging.getLogger(__name__)
# Its tracebacks can quote a database error's DETAIL line or an address.
logger.addFilter(RedactTracebacks())

Execute = Callable[[OutboxEvent], Run]

#: Claimed events a threaded slot may have waiting beside the one it runs.
QUEUED_PER_SLOT = 2


class InlineSlots:
    """One slot: run each event now, in the calling thread."""

    size = 1

    def __init__(
        self,
        *,
        execute: Execute,
        leases: Leases,
        using: str,
        stopping: threading.Event,
        batch_size: int,
    ) -> None:
        self.batch_size = batch_size
        self._execute = execute
        self._leases = leases
        self._using = using
        self._stopping = stopping
        self._finished: list[Run] = []

    @property
    def free(self) -> int:
        """How many events a claim may take now: a whole batch, run in turn."""
        return self.batch_size

    @property
    def in_flight(self) -> int:
        return 0

    queued = 0

    def start(self, events: list[OutboxEvent]) -> None:
        """Run the events one after another; stopping releases the rest."""
        for event in events:
            self._finished.append(
                start_one(
                    event,
                    execute=self._execute,
                    leases=self._leases,
                    using=self._using,
                    stopping=self._stopping,
                )
            )

    def collect(self) -> list[Run]:
        """Return the runs finished since the last call."""
        finished, self._finished = self._finished, []
        return finished

    def release_queued(self) -> None:
        """Nothing is queued: start() runs or releases every event it gets."""

    def close(self) -> None:
        """Close the broker connections the caller's thread opened (relays)."""
        relays.close_connections()


class ThreadedSlots:
    """Up to size events at once, one thread and one connection per slot."""

    def __init__(
        self,
        size: int,
        *,
        execute: Execute,
        leases: Leases,
        using: str,
        stopping: threading.Event,
        on_finish: Callable[[], None],
    ) -> None:
        self.size = size
        self._stopping = stopping
        self._execute = execute
        self._leases = leases
        self._using = using
        self._on_finish = on_finish
        self._jobs: queue.SimpleQueue[OutboxEvent | None] = queue.SimpleQueue()
        self._finished: queue.SimpleQueue[Run] = queue.SimpleQueue()
        #: Handed to the slots and not yet collected; only the worker's thread
        #: changes it.
        self._in_flight = 0
        self._threads = [
            threading.Thread(
                target=self._serve, name=f"outbox-slot-{number}", daemon=True
            )
            for number in range(1, size + 1)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def free(self) -> int:
        """How many more events the slots take now: one running and two
        queued per slot."""
        return QUEUED_PER_SLOT * self.size + self.size - self._in_flight

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        """How many claimed events wait for a slot: all slots are busy."""
        return self._jobs.qsize()

    def start(self, events: list[OutboxEvent]) -> None:
        """Queue each event for the next free slot."""
        if len(events) > self.free:
            raise RuntimeError(f"{len(events)} events for {self.free} free places")
        self._in_flight += len(events)
        for event in events:
            self._jobs.put(event)

    def release_queued(self) -> None:
        """Take back the queued events no slot has started: stopping."""
        while True:
            try:
                event = self._jobs.get_nowait()
            except queue.Empty:
                return
            if event is None:  # close() ran first; keep its sentinel
                self._jobs.put(None)
                return
            self._finished.put(Run(event, Outcome.RELEASED))

    def collect(self) -> list[Run]:
        """Return the runs finished since the last call, without waiting."""
        finished = []
        while True:
            try:
                finished.append(self._finished.get_nowait())
            except queue.Empty:
                break
        self._in_flight -= len(finished)
        return finished

    def close(self) -> None:
        """Stop the slot threads once their runs end; each closes its connection."""
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()

    def _serve(self) -> None:
        try:
            while (event := self._jobs.get()) is not None:
                self._finished.put(self._run(event))
                self._on_finish()
        finally:
            relays.close_connections()
            connections.close_all()

    def _run(self, event: OutboxEvent) -> Run:
        try:
            return start_one(
                event,
                execute=self._execute,
                leases=self._leases,
                using=self._using,
                stopping=self._stopping,
            )
        except BaseException:
            # A fault of the worker's own, not the handler's (those are
            # outcomes): leave the event to its lease, keep the slot.
            logger.exception(
                "outbox slot failed around event %s; its lease will lapse",
                event.pk,
                extra=event.describe(),
            )
            return Run(event, Outcome.LOST, recorded=True)
        finally:
            # A broken connection, or one past CONN_MAX_AGE, is replaced
            # before the slot's next event.
            connections[self._using].close_if_unusable_or_obsolete()


def start_one(
    event: OutboxEvent,
    *,
    execute: Execute,
    leases: Leases,
    using: str,
    stopping: threading.Event,
) -> Run:
    """Run one claimed event, unless stopping or its lease may be gone."""
    if stopping.is_set():
        return Run(event, Outcome.RELEASED)
    try:
        held = leases.still_held(event, using=using)
    except DatabaseError as error:
        # Not started, so given back uncharged by the worker's next turn.
        logger.warning(
            "outbox could not confirm the lease of event %s (%s); releasing it",
            event.pk,
            type(error).__name__,
            extra=event.describe(),
        )
        return Run(event, Outcome.RELEASED)
    if not held:
        return Run(event, Outcome.LOST, recorded=True)
    return execute(event)
