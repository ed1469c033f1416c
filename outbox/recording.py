"""Write the outcomes of finished runs, many in one transaction.

Call record() inside a transaction. Completions and releases of many events
are one fenced statement each (statements.py); a failure, rare, is one
fenced UPDATE of its own. An outcome whose fence matches nothing is LOST:
the event's lease lapsed and someone else owns it now. Finishing a key's
head promotes the key's next event in the same transaction.
"""

import logging
from dataclasses import dataclass
from functools import partial

from django.db import transaction

from outbox import ordering, statements
from outbox.handling import Outcome, Run
from outbox.models import OutboxEvent, Status
from outbox.publishing import notify_workers
from outbox.registry import get_handler

logger = logging.getLogger(__name__)


@dataclass
class BatchResult:
    """What the worker did with the events it claimed: counts per outcome."""

    claimed: int = 0
    completed: int = 0
    retried: int = 0
    failed: int = 0
    released: int = 0
    lost: int = 0
    #: How long the turn that recorded and claimed these took.
    seconds: float = 0.0

    def count(self, outcome: Outcome, number: int = 1) -> None:
        match outcome:
            case Outcome.COMPLETED:
                self.completed += number
            case Outcome.RETRIED:
                self.retried += number
            case Outcome.FAILED:
                self.failed += number
            case Outcome.RELEASED:
                self.released += number
            case Outcome.LOST:
                self.lost += number

    def __iadd__(self, other: "BatchResult") -> "BatchResult":
        self.claimed += other.claimed
        self.completed += other.completed
        self.retried += other.retried
        self.failed += other.failed
        self.released += other.released
        self.lost += other.lost
        return self

    @property
    def finished(self) -> int:
        """Events whose outcome is known, for --max-events and the logs."""
        return self.completed + self.retried + self.failed + self.released + self.lost


@dataclass
class Recorded:
    result: BatchResult
    #: Lanes whose key a publisher held when their next event was to be
    #: promoted.
    lanes_to_recheck: set[ordering.Lane]


def record(runs: list[Run], *, using: str, worker_id: str) -> Recorded:
    """Write each run's outcome, fenced; return the counts and keys to re-check."""
    result = BatchResult()
    recheck: set[ordering.Lane] = set()
    to_complete = [run for run in runs if _pending(run, Outcome.COMPLETED)]
    to_release = [run for run in runs if _pending(run, Outcome.RELEASED)]
    completed = statements.complete(_held(to_complete), using=using)
    released = statements.release(_held(to_release), using=using)
    finished_lanes: set[ordering.Lane] = set()
    for run in runs:
        if run.recorded:
            # Its own transaction wrote its end, and told its handler.
            recheck |= run.lanes_to_recheck
            _log_completed(run, worker_id)
        elif run.outcome is Outcome.COMPLETED:
            run.outcome = _kept(run, run.event.pk in completed, Status.COMPLETED)
            _log_completed(run, worker_id)
            if run.outcome is Outcome.COMPLETED:
                after_end(run.event, using)
        elif run.outcome is Outcome.RELEASED:
            run.outcome = _kept(run, run.event.pk in released, Status.PENDING)
        else:
            run.outcome = write_failure(run, worker_id=worker_id, using=using)
        if (
            run.event.key
            and not run.recorded
            and ordering.finishes_key(run.event.status)
        ):
            finished_lanes.add(ordering.lane_of(run.event))
        result.count(run.outcome)
    if finished_lanes:
        recheck |= ordering.advance(finished_lanes, using)
    if released:
        notify_workers(using)  # ready again, for other workers
    return Recorded(result, recheck)


def write_failure(run: Run, *, worker_id: str, using: str) -> Outcome:
    """Keep a failed attempt's error and write its retry or its end, fenced."""
    event, error = run.event, run.error
    assert error is not None  # noqa: S101 - a failed run carries its error
    if not run.error_kept:
        event.record_attempt_error(worker=event.locked_by or worker_id, error=error)
        run.error_kept = True
    if run.outcome is Outcome.RETRIED and run.retry_in is not None:
        written = event.schedule_retry(delay=run.retry_in)
    else:
        written = event.fail()
    if not written:
        _log_lost(run, worker_id)
        run.recorded = True  # nothing to write, should the turn be retried
        return Outcome.LOST
    outcome = run.outcome
    if outcome is Outcome.FAILED:
        after_end(event, using)
    log = logger.error if outcome is Outcome.FAILED else logger.warning
    log(
        "outbox event %s id=%s type=%s attempt=%d/%d error=%s",
        outcome.value,
        event.pk,
        event.event_type,
        event.attempts,
        event.max_attempts,
        type(error).__name__,
        extra={
            "worker_id": worker_id,
            "error_class": type(error).__name__,
            "outcome": outcome.value,
            **event.describe(),
        },
    )
    return outcome


def after_end(event: OutboxEvent, using: str) -> None:
    """Tell the event's handler of its end, once the transaction writing it commits.

    Inside the caller's transaction (a turn's, the rescue's); a turn that
    fails rolls the callback back with it, and writes it again when retried.
    """
    registered = get_handler(event.event_type, event.subscriber)
    if registered is not None and registered.ended is not None:
        transaction.on_commit(
            partial(registered.ended, event), using=using, robust=True
        )


def _pending(run: Run, outcome: Outcome) -> bool:
    return run.outcome is outcome and not run.recorded


def _held(runs: list[Run]) -> list[statements.Held]:
    return [(run.event.pk, run.event.lease_token or 0) for run in runs]


def _kept(run: Run, written: bool, status: str) -> Outcome:
    if not written:
        _log_lost(run, run.event.locked_by)
        run.recorded = True  # nothing to write, should the turn be retried
        return Outcome.LOST
    run.event.status = status
    return run.outcome


def _log_completed(run: Run, worker_id: str) -> None:
    if run.outcome is Outcome.COMPLETED and logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "outbox event completed id=%s type=%s attempt=%d",
            run.event.pk,
            run.event.event_type,
            run.event.attempts,
            extra={"worker_id": worker_id, **run.event.describe()},
        )


def _log_lost(run: Run, worker_id: str) -> None:
    logger.warning(
        "outbox lease lost before the outcome was written; event %s belongs "
        "to another claim now",
        run.event.pk,
        extra={"worker_id": worker_id, **run.event.describe()},
    )
