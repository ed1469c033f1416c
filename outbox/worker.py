"""The claimer: claim ready events, run their handlers, record the outcomes.

One tick (Worker.run_once) is two short transactions:

1. Claim: lock up to batch_size ready events with SELECT ... FOR UPDATE SKIP
   LOCKED, mark them processing with the attempt counted and a lease, commit.
2. Outcome: one fenced UPDATE marks the batch completed, but only the events
   this worker still owns (same worker, same attempt); its row locks keep
   every other worker off them. The handlers then run in this transaction,
   each inside a savepoint opened just before its first query, so a handler's
   writes commit together with its completed mark, and a handler that fails
   loses only its own writes. Failures are rewritten before the commit.

Events with a non-empty key run one at a time in publish order: only the
earliest unfinished event of a key is claimable (waiting=False); finishing it
promotes the next one in the same transaction.
"""

import logging
import random
import secrets
import threading
import time
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any

from django.db import connections, router, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import DateTimeField, ExpressionWrapper, F, QuerySet
from django.db.models.functions import Now
from django.db.transaction import TransactionManagementError

from outbox import ordering
from outbox.compiled import CompiledUpdate
from outbox.conf import OutboxSettings, get_settings
from outbox.errors import HandlerNotFound, LeaseExpired, PermanentFailure, Retry
from outbox.models import OutboxEvent, Status
from outbox.publishing import notify_workers
from outbox.registry import HandlerFunction, get_handler

logger = logging.getLogger(__name__)

#: Expired leases rescued per transaction; the rest wait for the next round.
RESCUE_BATCH = 500
#: Savepoints per outcome transaction. PostgreSQL caches 64 subtransactions
#: per transaction; past that, every session's visibility checks slow down.
MAX_SUBTRANSACTIONS = 60


@dataclass
class BatchResult:
    """What one or more ticks did, for logs, tests and the drain helper."""

    claimed: int = 0
    completed: int = 0
    retried: int = 0
    failed: int = 0
    released: int = 0
    lost: int = 0

    def __iadd__(self, other: "BatchResult") -> "BatchResult":
        for field in fields(self):
            setattr(
                self, field.name, getattr(self, field.name) + getattr(other, field.name)
            )
        return self


class Worker:
    """Claims and handles outbox events; the command's loop calls run_once()."""

    def __init__(
        self,
        *,
        worker_id: str | None = None,
        batch_size: int | None = None,
        stuck_timeout_ms: int | None = None,
        settings: OutboxSettings | None = None,
    ) -> None:
        self.settings = settings or get_settings()
        self.worker_id = worker_id or self.settings.default_worker_id
        self.batch_size = batch_size or self.settings.batch_size
        self.lease = timedelta(
            milliseconds=stuck_timeout_ms or self.settings.stuck_timeout_ms
        )
        self.using = router.db_for_write(OutboxEvent)
        #: Set to stop between handlers; unstarted events are given back.
        self.stop_requested = threading.Event()
        self._rescue_every = min(self.lease.total_seconds() / 2, 5.0)
        self._next_rescue = 0.0
        self._sweep_every = self.lease.total_seconds()
        self._next_sweep = 0.0
        self._keys_to_recheck: set[str] = set()
        self._claimed_ahead: list[OutboxEvent] = []
        #: Lease tokens of the batches this worker holds and will record
        #: outcomes for; the heartbeat extends these leases and no others.
        #: Replaced, never mutated, so the heartbeat thread can read it.
        self.held_tokens: frozenset[int] = frozenset()
        self._compiled_ready: dict[int, tuple[str, tuple[Any, ...]]] = {}
        self._lease_update = CompiledUpdate(self._lease, using=self.using)
        self._completion_update = CompiledUpdate(self._complete, using=self.using)

    @property
    def connection(self) -> BaseDatabaseWrapper:
        return connections[self.using]

    def run_once(self) -> BatchResult:
        """Rescue expired leases when due, then claim and handle one batch."""
        now = time.monotonic()
        if now >= self._next_rescue:
            self.rescue_expired()
            self._next_rescue = now + self._rescue_every
        if now >= self._next_sweep:
            self.promote_orphaned_keys()
            self._next_sweep = now + self._sweep_every
        if self._keys_to_recheck:
            self._recheck_keys()
        events, self._claimed_ahead = self._claimed_ahead or self.claim(), []
        if not events:
            return BatchResult()
        return self.process(events)

    @property
    def holds_claimed_ahead(self) -> bool:
        """Whether a batch claimed ahead waits for the next tick."""
        return bool(self._claimed_ahead)

    def release_claimed_ahead(self) -> int:
        """Give back the batch claimed for the next tick; call before stopping."""
        events, self._claimed_ahead = self._claimed_ahead, []
        if not events:
            return 0
        self._forget(events)
        with transaction.atomic(using=self.using):
            owned = self._mark_completed(events)
            for event in owned:
                event.release()
            notify_workers(self.using)  # ready again, for other workers
        return len(events)

    def claim(self) -> list[OutboxEvent]:
        """Lock up to batch_size ready events and lease them to this worker."""
        with transaction.atomic(using=self.using):
            events = self._claim()
        self._hold(events)
        return events

    def _hold(self, events: list[OutboxEvent]) -> None:
        if events:
            self.held_tokens = self.held_tokens | {events[0].lease_token or 0}

    def _forget(self, events: list[OutboxEvent]) -> None:
        """Stop extending the batch's lease: it is finished, released or lost."""
        if events:
            self.held_tokens = self.held_tokens - {events[0].lease_token or 0}

    def _claim(self) -> list[OutboxEvent]:
        """Lock and lease a batch inside the caller's transaction."""
        events = list(OutboxEvent.objects.using(self.using).raw(*self._ready_sql()))
        if not events:
            return []
        token = secrets.randbits(63)
        self._lease_update.run([event.pk for event in events], token)
        for event in events:
            event.status = Status.PROCESSING
            event.attempts += 1
            event.locked_by = self.worker_id
            event.lease_token = token
        return events

    def _ready_sql(self) -> tuple[str, tuple[Any, ...]]:
        """Return the claim's SELECT ... FOR UPDATE SKIP LOCKED, compiled once.

        The ORM's select_for_update(skip_locked=True) query never changes
        for a batch size; compiling it for every batch cost more than running
        it. raw() turns its rows back into events.
        """
        if self.batch_size not in self._compiled_ready:
            ready = (
                OutboxEvent.objects.using(self.using)
                .ready()
                # Read only on failure, and then loaded on demand.
                .defer("history")
                .select_for_update(skip_locked=True)[: self.batch_size]
            )
            compiler = ready.query.get_compiler(using=self.using)
            self._compiled_ready[self.batch_size] = compiler.as_sql()
        return self._compiled_ready[self.batch_size]

    def process(self, events: list[OutboxEvent]) -> BatchResult:
        """Run the handlers of claimed events and record every outcome."""
        started = time.monotonic()
        result = BatchResult(claimed=len(events))
        try:
            ahead = self._process(events, result)
        finally:
            # Finished, or lost with a failed transaction: either way no
            # longer this worker's to extend. A lost batch's lease lapses and
            # the rescue gives it to whoever claims next.
            self._forget(events)
        self._claimed_ahead = ahead
        self._hold(ahead)
        self._log_batch(result, started)
        return result

    def _process(
        self, events: list[OutboxEvent], result: BatchResult
    ) -> list[OutboxEvent]:
        """Record the batch's outcomes in one transaction; return the next batch."""
        with transaction.atomic(using=self.using):
            owned = self._mark_completed(events)
            result.lost = len(events) - len(owned)
            finished_keys, held_heads = self._handle_all(owned, result)
            # A handler may have published behind a head that then did not
            # finish; such events must wait again.
            ordering.hold_back_behind(held_heads, self.using)
            if finished_keys:
                self._promote_next_of_keys(finished_keys)
            if result.released:
                notify_workers(self.using)  # ready again, for other workers
            # A full batch suggests more work: claim the next one here, so its
            # lease commits with these outcomes, one commit per batch instead
            # of two. Its locks are held only from here to the commit.
            full = len(events) == self.batch_size and not result.released
            return self._claim() if full and not self.stop_requested.is_set() else []

    def _log_batch(self, result: BatchResult, started: float) -> None:
        if not logger.isEnabledFor(logging.INFO):
            return
        logger.info(
            "outbox batch claimed=%d completed=%d retried=%d failed=%d "
            "released=%d lost=%d duration_ms=%.1f",
            result.claimed,
            result.completed,
            result.retried,
            result.failed,
            result.released,
            result.lost,
            (time.monotonic() - started) * 1000,
            extra={"worker_id": self.worker_id, **vars(result)},
        )

    def _handle_all(
        self, owned: list[OutboxEvent], result: BatchResult
    ) -> tuple[set[str], dict[str, int]]:
        """Run each handler; return the keys finished and the heads held."""
        finished_keys: set[str] = set()
        held_heads: dict[str, int] = {}
        scope = _HandlerScope(self.using)
        with self.connection.execute_wrapper(scope):
            for index, event in enumerate(owned):
                if (
                    self.stop_requested.is_set()
                    or scope.exhausted
                    or index >= self.batch_size
                ):
                    # Stopping, the transaction has as many subtransactions as
                    # PostgreSQL caches, or the batch claimed ahead is larger
                    # than the current limit: give the rest back, uncharged.
                    for unstarted in owned[index:]:
                        unstarted.release()
                        if unstarted.key:
                            held_heads[unstarted.key] = unstarted.pk
                    result.released = len(owned) - index
                    break
                outcome = self._handle(event, scope)
                setattr(result, outcome, getattr(result, outcome) + 1)
                if event.key and outcome == "retried":
                    held_heads[event.key] = event.pk
                elif event.key:
                    finished_keys.add(event.key)
        return finished_keys, held_heads

    def rescue_expired(self) -> int:
        """Return events of dead workers to pending, or fail them if used up."""
        finished_keys: set[str] = set()
        with transaction.atomic(using=self.using):
            expired = list(
                OutboxEvent.objects.using(self.using)
                .expired()
                .order_by("locked_until")
                .select_for_update(skip_locked=True)[:RESCUE_BATCH]
            )
            for event in expired:
                error = LeaseExpired(event.locked_by)
                if self._record_failure(event, error) == "failed" and event.key:
                    finished_keys.add(event.key)
            if finished_keys:
                self._promote_next_of_keys(finished_keys)
        if expired:
            logger.warning(
                "outbox rescued %d events with expired leases",
                len(expired),
                extra={"worker_id": self.worker_id, "rescued": len(expired)},
            )
        return len(expired)

    def promote_orphaned_keys(self) -> int:
        """Give every key with unfinished events a claimable head again.

        A worker that dies after committing a key's finished event, while a
        publisher of that key was still inside its transaction, leaves the
        publisher's event waiting with nothing ahead of it. This backstop
        scans the unfinished keyed events, so it runs once per lease period.
        """
        promoted = ordering.promote_orphaned_heads(self.using)
        if promoted:
            logger.warning(
                "outbox promoted %d orphaned key heads",
                promoted,
                extra={"worker_id": self.worker_id, "promoted": promoted},
            )
        return promoted

    def backoff(self, attempt: int) -> timedelta:
        """Return the delay before retrying after the given failed attempt.

        Exponential from the base, capped, with "equal jitter": a random
        delay between half and all of it, so retries of events that failed
        together spread out instead of failing together again.
        """
        base = self.settings.backoff_base_ms
        ceiling = min(self.settings.backoff_cap_ms, base * 2 ** min(attempt - 1, 32))
        jittered = random.uniform(ceiling / 2, ceiling)  # noqa: S311 - not crypto
        return timedelta(milliseconds=jittered)

    def _lease(
        self, ids: list[int], token: int
    ) -> tuple[QuerySet[OutboxEvent], dict[str, Any]]:
        """The claim's UPDATE: processing, attempt counted, leased to us."""
        return OutboxEvent.objects.using(self.using).filter(pk__in=ids), {
            "status": Status.PROCESSING,
            "attempts": F("attempts") + 1,
            "locked_by": self.worker_id,
            "locked_until": self.lease_end(),
            "lease_token": token,
        }

    def _complete(
        self, ids: list[int], token: int
    ) -> tuple[QuerySet[OutboxEvent], dict[str, Any]]:
        """The outcome's fenced UPDATE: completed, if still under our token."""
        owned = OutboxEvent.objects.using(self.using).filter(
            pk__in=ids, lease_token=token, status=Status.PROCESSING
        )
        return owned, {
            "status": Status.COMPLETED,
            "completed_at": Now(),
            "locked_until": None,
        }

    def lease_end(self) -> ExpressionWrapper:
        return ExpressionWrapper(Now() + self.lease, output_field=DateTimeField())

    def _mark_completed(self, events: list[OutboxEvent]) -> list[OutboxEvent]:
        """Mark the events this worker still owns completed; return them.

        The fence is the claim's lease token: a worker whose lease expired,
        and whose event was rescued and claimed again, matches nothing here.
        """
        token = events[0].lease_token or 0
        count = self._completion_update.run([event.pk for event in events], token)
        if count == len(events):
            owned = events
        else:
            owned_ids = set(
                OutboxEvent.objects.using(self.using)
                .filter(
                    pk__in=[event.pk for event in events],
                    lease_token=token,
                    status=Status.COMPLETED,
                )
                .values_list("pk", flat=True)
            )
            owned = [event for event in events if event.pk in owned_ids]
            for event in events:
                if event.pk not in owned_ids:
                    logger.warning(
                        "outbox lease lost before handling; skipping event %s",
                        event.pk,
                        extra={"worker_id": self.worker_id, **event.describe()},
                    )
        for event in owned:
            event.status = Status.COMPLETED
        return owned

    def _handle(self, event: OutboxEvent, scope: "_HandlerScope") -> str:
        """Run the event's handler; return "completed", "retried" or "failed"."""
        registered = get_handler(event.event_type)
        if registered is None:
            return self._record_failure(event, HandlerNotFound(event.event_type))
        error = scope.run(registered.function, event)
        if error is not None:
            return self._record_failure(event, error)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "outbox event completed id=%s type=%s attempt=%d",
                event.pk,
                event.event_type,
                event.attempts,
                extra={"worker_id": self.worker_id, **event.describe()},
            )
        return "completed"

    def _record_failure(self, event: OutboxEvent, error: BaseException) -> str:
        """Keep the attempt's error; retry the event or fail it for good."""
        event.record_attempt_error(
            worker=event.locked_by or self.worker_id, error=error
        )
        if isinstance(error, PermanentFailure) or event.attempts >= event.max_attempts:
            event.fail()
            outcome = "failed"
        else:
            delay = (
                error.after
                if isinstance(error, Retry)
                else self.backoff(event.attempts)
            )
            event.schedule_retry(delay=delay)
            outcome = "retried"
        log = logger.error if outcome == "failed" else logger.warning
        log(
            "outbox event %s id=%s type=%s attempt=%d/%d error=%s",
            outcome,
            event.pk,
            event.event_type,
            event.attempts,
            event.max_attempts,
            type(error).__name__,
            extra={
                "worker_id": self.worker_id,
                "error_class": type(error).__name__,
                "outcome": outcome,
                **event.describe(),
            },
        )
        return outcome

    def _promote_next_of_keys(self, keys: set[str]) -> None:
        """Make the next event of each finished key claimable.

        A publisher of the key still inside its transaction may add an event
        this cannot see yet; such a key's lock is busy, so it is checked
        again on the next tick (which that publisher's NOTIFY triggers).
        """
        busy = ordering.busy_keys(keys, self.using)
        ordering.promote_heads(keys, self.using)
        self._keys_to_recheck = (self._keys_to_recheck - keys) | busy

    def _recheck_keys(self) -> None:
        """Promote the keys a publisher or an operator held at the last try.

        Unlike a head's own outcome transaction, this one holds no row lock
        that an operator's retry would wait for, so a key still held is left
        for the next tick rather than promoted under someone's feet.
        """
        with transaction.atomic(using=self.using):
            busy = ordering.busy_keys(self._keys_to_recheck, self.using)
            ordering.promote_heads(self._keys_to_recheck - busy, self.using)
        self._keys_to_recheck = busy


class _HandlerScope:
    """Run a batch's handlers in its transaction, each isolated from the others.

    Installed as the connection's execute wrapper for the whole batch, it
    opens a savepoint just before a handler's first query: most handlers (an
    email, an HTTP call) never touch the database, and a savepoint would cost
    them two round trips for nothing. A handler that fails loses its writes
    and the on_commit callbacks it registered (no ghost email), and leaves the
    transaction usable for the next handler. Queries outside handlers pass
    through untouched.
    """

    def __init__(self, using: str) -> None:
        self.using = using
        self.connection = connections[using]
        # Counts every savepoint Django opens from here on, the handlers' own
        # atomic() blocks included, not just the scope's.
        self._savepoints_before = self.connection.savepoint_state
        self._constraints_checked_now = False
        self._in_handler = False
        self._savepoint_id: str | None = None
        self._opened = False

    @property
    def exhausted(self) -> bool:
        """Whether the transaction has as many savepoints as PostgreSQL caches."""
        opened = self.connection.savepoint_state - self._savepoints_before
        return opened >= MAX_SUBTRANSACTIONS

    def __call__(
        self, execute: Any, sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        if self._in_handler and not self._opened:
            self._opened = True
            self._in_handler = False  # the savepoint's own queries pass through
            try:
                self._savepoint_id = self._open_savepoint()
            finally:
                self._in_handler = True
        return execute(sql, params, many, context)

    def run(self, function: HandlerFunction, event: OutboxEvent) -> Exception | None:
        """Run function(event); return the exception it raised, if any."""
        connection = self.connection
        callbacks = len(connection.run_on_commit)
        self._savepoint_id = None
        self._opened = False
        self._in_handler = True
        try:
            function(event)
            if connection.needs_rollback:
                raise TransactionManagementError(
                    "the handler caught a database error inside "
                    "transaction.atomic() and went on"
                )
            self._in_handler = False
            if self._savepoint_id is not None:
                connection.savepoint_commit(self._savepoint_id)
        except Exception as error:
            self._in_handler = False
            self._roll_back()
            del connection.run_on_commit[callbacks:]
            return error
        finally:
            self._in_handler = False
        return None

    def _open_savepoint(self) -> str | None:
        if self.connection.vendor == "postgresql" and not self._constraints_checked_now:
            # Django's foreign keys are DEFERRABLE INITIALLY DEFERRED: a bad
            # write would fail at COMMIT and take the whole batch with it.
            # Checked at each statement, it fails the handler that made it.
            with self.connection.cursor() as cursor:
                cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
            self._constraints_checked_now = True
        return self.connection.savepoint()

    def _roll_back(self) -> None:
        """Undo the handler's writes and let the batch's transaction go on."""
        # A failed query, or an atomic(savepoint=False) block, inside the
        # handler marks the whole transaction for rollback; rolling back to
        # the savepoint taken before the handler undoes all it did, as
        # Atomic.__exit__ does for its own savepoints.
        transaction.set_rollback(False, using=self.using)
        if self._savepoint_id is not None:
            self.connection.savepoint_rollback(self._savepoint_id)
