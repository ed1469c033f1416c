"""Run one claimed event's handler and say how it ended.

run_event() is what a slot does with an event (see slots.py). The handler
runs inside a transaction of its own, on the slot's connection:

- It returned and never wrote: its completion is left to the worker, which
  records the completions of many events with one statement (Run.recorded
  is False). Most handlers (an email, an HTTP call) end this way.
- It returned and wrote: its completed mark is written in the same
  transaction, fenced on the claim's lease token, so its writes and its
  mark commit together or not at all (Run.recorded is True). A lost lease
  rolls its writes back.
- It raised (or its commit failed): its writes and the on_commit callbacks
  it registered are rolled back, and the failure is left to the worker,
  decided already: retried after a backoff, or failed for good.

A handler that uses no database (a relay: Handler.uses_database is False)
runs without a transaction, outside a caller's, and ends as one that never
wrote, or raised.

async def handlers run through asgiref's async_to_sync in the slot's
thread: each call gets an event loop of its own, and the ORM calls it makes
(sync_to_async, thread-sensitive) come back to that thread and its
transaction. A slot is busy while an async handler awaits, as for a
blocking one.
"""

import asyncio
import enum
import logging
import random
import time
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial

from django.db import connections, transaction
from django.db.transaction import TransactionManagementError

from outbox import ordering, statements, tracing
from outbox.errors import HandlerNotFound, PermanentFailure, Retry
from outbox.models import OutboxEvent, Status
from outbox.registry import Handler, get_handler

logger = logging.getLogger(__name__)


class Outcome(enum.Enum):
    """What became of a claimed event."""

    #: The handler returned; the event is done.
    COMPLETED = "completed"
    #: The handler raised with attempts left: pending again after a backoff.
    RETRIED = "retried"
    #: The handler raised for the last time, or gave up: terminal.
    FAILED = "failed"
    #: Never started (the worker was stopping): pending again, uncharged.
    RELEASED = "released"
    #: The claim's lease was lost: another owner decides its fate.
    LOST = "lost"


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff, capped, with "equal jitter".

    The delay after the nth failed attempt is base * 2**(n-1), capped,
    then a random share between half and all of it, so retries of events
    that failed together spread out instead of failing together again.
    """

    base_ms: int
    cap_ms: int

    def delay(self, attempt: int) -> timedelta:
        """Return the delay before retrying after the given failed attempt."""
        ceiling = min(self.cap_ms, self.base_ms * 2 ** min(attempt - 1, 32))
        jittered = random.uniform(ceiling / 2, ceiling)  # noqa: S311 - not crypto
        return timedelta(milliseconds=jittered)


@dataclass
class Run:
    """One event's run in a slot."""

    event: OutboxEvent
    outcome: Outcome
    #: Whether nothing is left to write: the run's own transaction wrote its
    #: completion, or its lease was lost (someone else owns the event).
    recorded: bool = False
    #: Whether the attempt's error is already in event.history (a turn that
    #: failed after writing it retries without adding it twice).
    error_kept: bool = False
    error: BaseException | None = None
    #: For RETRIED: how long until the next attempt.
    retry_in: timedelta | None = None
    #: Lanes whose next event a publisher held back from promotion.
    lanes_to_recheck: set[ordering.Lane] = field(default_factory=set)
    #: Seconds the run took, its transaction included (None: never ran).
    duration: float | None = None


def run_event(event: OutboxEvent, *, using: str, backoff: Backoff) -> Run:
    """Run the event's handler in a transaction of its own; return how it ended.

    With OpenTelemetry, inside the event's process span (outbox.tracing).
    """
    started = time.perf_counter()
    with tracing.processing(event) as span:
        run = _run(event, using, backoff)
        span.finished(run.outcome.value, run.error)
    run.duration = time.perf_counter() - started
    return run


def _run(event: OutboxEvent, using: str, backoff: Backoff) -> Run:
    registered = get_handler(event.event_type, event.subscriber)
    if registered is None:
        return failed_run(
            event, HandlerNotFound(event.event_type, event.subscriber), backoff
        )
    try:
        if _needs_no_transaction(registered, using):
            registered.call(event)
            return Run(event, Outcome.COMPLETED)
        return _run_in_transaction(registered, event, using)
    except _LeaseLost:
        return Run(event, Outcome.LOST, recorded=True)
    except (Exception, asyncio.CancelledError) as error:
        # CancelledError: an async handler's task was cancelled; a failure.
        return failed_run(event, error, backoff)


def _needs_no_transaction(registered: Handler, using: str) -> bool:
    """Whether the handler can run outside a transaction of its own: it uses
    no database (a relay), and no caller's transaction is open (drain() in a
    test's), where a handler's mark is written at once, in that transaction.

    A transaction's bookkeeping per event, with nothing to commit, cost a
    concurrency-16 relay about a tenth of its rate.
    """
    return (
        not registered.uses_database
        and registered.ended is None
        and not connections[using].in_atomic_block
    )


def gives_up(event: OutboxEvent, error: BaseException) -> bool:
    """Whether this failed attempt is the event's last: it ends failed."""
    return isinstance(error, PermanentFailure) or event.attempts >= event.max_attempts


def failed_run(event: OutboxEvent, error: BaseException, backoff: Backoff) -> Run:
    """Decide a failed attempt's outcome: retried after a delay, or failed."""
    if gives_up(event, error):
        return Run(event, Outcome.FAILED, error=error)
    delay = error.after if isinstance(error, Retry) else backoff.delay(event.attempts)
    return Run(event, Outcome.RETRIED, error=error, retry_in=delay)


class _LeaseLost(Exception):  # noqa: N818 - a signal, not an error
    """The fenced mark matched nothing: roll the handler's writes back."""


def _run_in_transaction(registered: Handler, event: OutboxEvent, using: str) -> Run:
    connection = connections[using]
    with transaction.atomic(using=using):
        writes = statements.WriteCheck(using)
        registered.call(event)
        if connection.needs_rollback:
            raise TransactionManagementError(
                "the handler caught a database error inside transaction.atomic() "
                "and went on"
            )
        if not writes.wrote():
            return Run(event, Outcome.COMPLETED)
        held = [(event.pk, event.lease_token or 0)]
        if not statements.complete(held, using=using):
            raise _LeaseLost
        event.status = Status.COMPLETED
        busy = (
            ordering.advance([ordering.lane_of(event)], using) if event.key else set()
        )
        if registered.ended is not None:
            # Its end is this transaction's: told once it commits, if it does.
            transaction.on_commit(
                partial(registered.ended, event), using=using, robust=True
            )
    return Run(event, Outcome.COMPLETED, recorded=True, lanes_to_recheck=busy)
