import secrets
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from datetime import timedelta
from traceback import format_exception
from typing import Any, ClassVar

from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.db.models import Q
from django.db.models.functions import Now
from django.utils import timezone

from outbox.causes import cause_of
from outbox.redaction import redact
from outbox.storable import storable

#: Entries kept in OutboxEvent.history; older ones are dropped first.
HISTORY_LIMIT = 25
#: Characters of an error message kept in last_error and the history.
MESSAGE_LIMIT = 1000
#: Characters of a failed attempt's traceback kept in the history: its end,
#: where the frame that raised and the exception are.
TRACEBACK_LIMIT = 4000
#: The queue of events published without one, and of django.tasks' tasks
#: (django.tasks.DEFAULT_TASK_QUEUE_NAME).
DEFAULT_QUEUE = "default"


class Status(models.TextChoices):
    PENDING = "pending", "Pending"
    PROCESSING = "processing", "Processing"
    COMPLETED = "completed", "Completed"
    FAILED = "failed", "Failed"


UNFINISHED = (Status.PENDING, Status.PROCESSING)
#: The statuses an operator looks for; completed events are the bulk.
OPEN_TO_OPERATORS = (Status.PENDING, Status.PROCESSING, Status.FAILED)


class OutboxEventQuerySet(models.QuerySet["OutboxEvent"]):
    def ready(self, queues: Collection[str] = ()) -> "OutboxEventQuerySet":
        """Return events a worker may claim now, oldest first.

        An event that waits behind an earlier event of its key is not ready;
        the filter matches the partial index outbox_ready_idx exactly. Given
        queues, only events of those queues: one queue is read from
        outbox_ready_queue_idx, in order.
        """
        ready = self.filter(
            status=Status.PENDING, waiting=False, available_at__lte=Now()
        )
        if len(queues) == 1:
            # The same order, spelled so that only outbox_ready_queue_idx
            # gives it unsorted: the claim, planned with sorts off, reads that
            # index whatever the statistics say of the queue's share. (With
            # queue_name = 'x', PostgreSQL would drop the column from the
            # order and could read outbox_ready_idx past other queues' rows.)
            return ready.filter(queue_name__outbox_any=list(queues)).order_by(
                "queue_name", "available_at", "id"
            )
        if queues:
            ready = ready.filter(queue_name__in=sorted(queues))
        return ready.order_by("available_at", "id")

    def expired(self) -> "OutboxEventQuerySet":
        """Return events whose worker's lease has run out (the worker died)."""
        return self.filter(status=Status.PROCESSING, locked_until__lt=Now())

    def unfinished_of_key(self, key: str) -> "OutboxEventQuerySet":
        """Return the pending or processing events of key, every subscriber's."""
        return self.filter(key=key, status__in=UNFINISHED)

    def unfinished_of_lane(self, key: str, subscriber: str) -> "OutboxEventQuerySet":
        """Return the pending or processing events of key for one subscriber."""
        return self.filter(key=key, subscriber=subscriber, status__in=UNFINISHED)

    def claim(
        self,
        *,
        worker_id: str,
        limit: int,
        lease: timedelta,
        queues: Collection[str] = (),
    ) -> "Batch":
        """Lock up to limit ready events and lease them to worker_id.

        One statement, in the caller's transaction or, in autocommit, one of
        its own: the events are locked with SELECT ... FOR UPDATE SKIP LOCKED
        and marked processing, attempt counted, under a fresh lease token,
        the fence every outcome of the batch is written on. Given queues, only
        events of those queues.
        """
        # statements builds its SQL from this module's model, so it comes late.
        from outbox import statements

        token = secrets.randbits(63)
        events = statements.claim(
            using=self.db,
            limit=limit,
            worker_id=worker_id,
            token=token,
            lease=lease,
            queues=tuple(sorted(set(queues))),
        )
        return Batch(events=events, token=token)


@dataclass(frozen=True)
class Batch:
    """Events one claim leased, with the token that fences their outcomes."""

    events: list["OutboxEvent"]
    token: int

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self) -> Iterator["OutboxEvent"]:
        return iter(self.events)


class OutboxEvent(models.Model):
    """A side effect to perform once the transaction that wrote it commits."""

    # The event's: its deliveries (one row per subscriber) share it.
    uuid = models.UUIDField(default=uuid.uuid4, editable=False)
    event_type = models.CharField(max_length=200)
    # One row per subscriber of the event type (outbox.registry): each row is
    # that subscriber's delivery of the event, with its own status, attempts,
    # lease and retries, and its own order per key.
    subscriber = models.CharField(
        max_length=100,
        blank=True,
        default="",
        db_default="",
        help_text="The named handler (or relay) this row delivers the event to; "
        "empty for the event type's unnamed handler.",
    )
    payload = models.JSONField(encoder=DjangoJSONEncoder)
    key = models.CharField(
        max_length=200,
        blank=True,
        default="",
        help_text="Events with the same non-empty key are handled one at a time, "
        "in publish order.",
    )
    # NULL, not "", means none, so the partial unique index skips it.
    idempotency_key = models.CharField(  # noqa: DJ001
        max_length=200, null=True, blank=True
    )
    # A worker started with --queue claims only its queues' events.
    queue_name = models.CharField(
        max_length=200, default=DEFAULT_QUEUE, db_default=DEFAULT_QUEUE
    )
    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.PENDING
    )
    waiting = models.BooleanField(
        default=False,
        help_text="True while an earlier unfinished event of the same key exists.",
    )
    attempts = models.PositiveIntegerField(default=0)
    max_attempts = models.PositiveIntegerField()
    # The database's clock, not the web server's: the claim compares against
    # now() in the database, so publishers with skewed clocks cannot delay it.
    available_at = models.DateTimeField(db_default=Now())
    locked_by = models.CharField(max_length=200, blank=True, default="")
    locked_until = models.DateTimeField(null=True, blank=True)
    # The fencing token of the claim that holds the event: a fresh random
    # number per claimed batch. A worker records outcomes only on rows that
    # still carry its token, so one whose lease expired and was taken over
    # (even by a process misconfigured with the same worker id) changes
    # nothing.
    lease_token = models.BigIntegerField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(db_default=Now())
    # Written by the claim: its first attempt's, and its latest.
    started_at = models.DateTimeField(null=True, blank=True)
    last_attempted_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    # Pruning ages failed events from here, not from created_at: an event an
    # operator retried last week and that failed again today is today's
    # failure. Events that failed before this column existed have none, and
    # are aged by created_at.
    failed_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="When the event last ended failed: its last attempt, or an "
        "operator's discard.",
    )
    last_error = models.TextField(blank=True, default="")
    # Failed events of one cause share it: the admin's dead letters group by
    # event type and this (outbox.causes).
    error_cause = models.CharField(
        max_length=300,
        blank=True,
        default="",
        db_default="",
        help_text="The last error's class and first line, with numbers, ids "
        "and quoted values stripped.",
    )
    history = models.JSONField(
        default=list,
        blank=True,
        encoder=DjangoJSONEncoder,
        help_text="One entry per failed attempt (when, worker, error class, "
        "message and traceback) or operator action (when, who, what). Never "
        "the payload.",
    )
    discarded_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="When an operator discarded the event; it never runs again.",
    )
    discarded_by = models.CharField(max_length=200, blank=True, default="")
    # What a django.tasks task returned (outbox.tasks); NULL for None, and
    # for events.
    result = models.JSONField(null=True, blank=True, encoder=DjangoJSONEncoder)
    # {"traceparent": ..., "tracestate": ...} of the span that published the
    # event (outbox.tracing); NULL without OpenTelemetry or an active span.
    trace_context = models.JSONField(null=True, blank=True, editable=False)

    objects = OutboxEventQuerySet.as_manager()

    class Meta:
        verbose_name = "outbox event"
        ordering = ("-id",)
        permissions: ClassVar = [
            ("retry_outboxevent", "Can retry outbox events"),
            ("discard_outboxevent", "Can discard outbox events"),
        ]
        indexes: ClassVar = [
            # The claim: pending, not waiting behind its key, oldest first.
            models.Index(
                fields=("available_at", "id"),
                condition=Q(status=Status.PENDING, waiting=False),
                name="outbox_ready_idx",
            ),
            # The claim of a worker started with one --queue.
            models.Index(
                fields=("queue_name", "available_at", "id"),
                condition=Q(status=Status.PENDING, waiting=False),
                name="outbox_ready_queue_idx",
            ),
            # The rescue of events whose worker died.
            models.Index(
                fields=("locked_until",),
                condition=Q(status=Status.PROCESSING),
                name="outbox_lease_idx",
            ),
            # The head of each key's lane (a key's events of one subscriber):
            # publish and promotion look it up.
            models.Index(
                fields=("key", "subscriber", "id"),
                condition=Q(status__in=UNFINISHED) & ~Q(key=""),
                name="outbox_lane_unfinished_idx",
            ),
            # The admin's status filter and summary, "retry all failed", and
            # outbox_status. Completed events, the bulk of the table, leave it
            # as they complete, so it stays small and costs nothing for them.
            models.Index(
                fields=("status", "id"),
                condition=Q(status__in=OPEN_TO_OPERATORS),
                name="outbox_status_idx",
            ),
            # No B-tree on created_at or completed_at: every claim and every
            # completion would write to it. The admin's date filter reads a
            # BRIN index (migration 0008, PostgreSQL); the pruner walks the
            # primary key, which follows creation, up to its cutoff.
            # The dead letters: failed deliveries not discarded, grouped by
            # type, subscriber and cause from the index alone.
            models.Index(
                fields=(
                    "event_type",
                    "subscriber",
                    "error_cause",
                    # Keys, not INCLUDE (SQLite has none): the page's dates
                    # come from the index too.
                    "failed_at",
                    "created_at",
                ),
                condition=Q(status=Status.FAILED, discarded_at__isnull=True),
                name="outbox_dead_letter_idx",
            ),
            # The keys held back: heads of a lane that failed an attempt and
            # wait for their retry. Rows enter it only while they do.
            models.Index(
                fields=("id",),
                condition=Q(status=Status.PENDING, waiting=False)
                & ~Q(key="")
                & ~Q(last_error=""),
                name="outbox_retrying_head_idx",
            ),
            # The admin's "has error" filter: only events that ever failed an
            # attempt are in it, a small share of a healthy table.
            models.Index(
                fields=("id",),
                condition=~Q(last_error=""),
                name="outbox_has_error_idx",
            ),
        ]
        constraints: ClassVar = [
            # Partial, so the many events without one add no index entry on
            # every insert and every status change.
            models.UniqueConstraint(
                fields=("idempotency_key", "subscriber"),
                condition=Q(idempotency_key__isnull=False),
                name="outbox_delivery_idempotency_unique",
            ),
            # One delivery of an event per subscriber; also the index of
            # lookups by UUID.
            models.UniqueConstraint(
                fields=("uuid", "subscriber"), name="outbox_delivery_unique"
            ),
            models.CheckConstraint(
                condition=Q(status__in=Status.values), name="outbox_status_valid"
            ),
            models.CheckConstraint(
                condition=Q(max_attempts__gte=1), name="outbox_max_attempts_positive"
            ),
            models.CheckConstraint(
                condition=Q(waiting=False) | ~Q(key=""),
                name="outbox_only_keyed_events_wait",
            ),
        ]

    def __str__(self) -> str:
        if self.subscriber:
            return f"{self.event_type} {self.uuid} to {self.subscriber}"
        return f"{self.event_type} {self.uuid}"

    def record_attempt_error(self, *, worker: str, error: BaseException) -> None:
        """Append the failed attempt to the history and keep its message.

        The message is redacted first (outbox.redaction): no email address,
        no value PostgreSQL quotes in a DETAIL line, outlives the attempt.
        """
        message = storable(_truncate(redact(str(error))))
        error_class = storable(error_class_name(error))
        self.last_error = f"{error_class}: {message}" if message else error_class
        self.error_cause = cause_of(self.last_error)
        entry = {
            "attempt": self.attempts,
            "at": timezone.now().isoformat(),
            "worker": worker,
            "error": error_class,
            "message": message,
        }
        if error.__traceback__ is not None:
            text = redact("".join(format_exception(error)))
            if len(text) > TRACEBACK_LIMIT:
                text = "…" + text[-(TRACEBACK_LIMIT - 1) :]
            entry["traceback"] = storable(text)
        self.history = [*self.history, entry][-HISTORY_LIMIT:]

    def schedule_retry(self, *, delay: timedelta) -> bool:
        """Return the claimed event to pending, available after delay.

        Fenced like every outcome: only while the claim that ran it still
        holds it. Return whether it did.
        """
        return self._record_outcome(status=Status.PENDING, available_at=Now() + delay)

    def fail(self) -> bool:
        """End the claimed event as failed: terminal until an operator retries it.

        Fenced like schedule_retry(); return whether it did.
        """
        return self._record_outcome(status=Status.FAILED, failed_at=Now())

    def _record_outcome(self, **values: Any) -> bool:
        """Write a failed attempt's outcome if the event's claim still holds it."""
        held = (
            type(self)
            ._default_manager.using(self._state.db)
            .filter(pk=self.pk, lease_token=self.lease_token, status=Status.PROCESSING)
        )
        changed = held.update(
            **values,
            locked_until=None,
            completed_at=None,
            last_error=self.last_error,
            error_cause=self.error_cause,
            history=self.history,
        )
        if changed:
            self.status = values["status"]
            self.locked_until = None
        return bool(changed)

    def reopen(self, *, actor: str) -> None:
        """Return the event to pending, available now, with a fresh attempt budget.

        The caller has set waiting through outbox.ordering; the history is kept.
        """
        self.status = Status.PENDING
        self.available_at = Now()
        self.attempts = 0
        self.locked_by = ""
        self.locked_until = None
        self.started_at = None
        self.last_attempted_at = None
        self.completed_at = None
        self.failed_at = None
        self.record_operator_action(action="retried", actor=actor)
        self.save(
            update_fields=[
                "status",
                "available_at",
                "attempts",
                "locked_by",
                "locked_until",
                "started_at",
                "last_attempted_at",
                "completed_at",
                "failed_at",
                "waiting",
                "history",
            ]
        )

    def discard(self, *, actor: str) -> None:
        """End a pending or failed event for good, recording who and when."""
        self.status = Status.FAILED
        self.discarded_at = Now()
        self.discarded_by = actor
        self.failed_at = Now()
        self.locked_until = None
        self.record_operator_action(action="discarded", actor=actor)
        self.save(
            update_fields=[
                "status",
                "failed_at",
                "discarded_at",
                "discarded_by",
                "locked_until",
                "history",
            ]
        )

    def record_operator_action(self, *, action: str, actor: str) -> None:
        """Append an operator's action to the history."""
        self.history = [
            *self.history,
            {
                "at": timezone.now().isoformat(),
                "operator": actor,
                "action": action,
            },
        ][-HISTORY_LIMIT:]

    def describe(self) -> dict[str, Any]:
        """Return the event's identity for structured logs: never the payload."""
        return {
            "event_id": self.pk,
            "event_uuid": str(self.uuid),
            "event_type": self.event_type,
            "subscriber": self.subscriber,
            "attempt": self.attempts,
        }


def error_class_name(error: BaseException) -> str:
    """The error's class as the history names it: builtins bare, others dotted."""
    cls = type(error)
    return (
        cls.__qualname__
        if cls.__module__ == "builtins"
        else (f"{cls.__module__}.{cls.__qualname__}")
    )


def _truncate(text: str) -> str:
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 1] + "…"


class AnyOf(models.Lookup):
    """column = ANY(array) on PostgreSQL, IN elsewhere: see ready()."""

    lookup_name = "outbox_any"
    prepare_rhs = False  # a list of names, not one

    def as_sql(self, compiler: Any, connection: Any) -> tuple[str, Any]:
        lhs, lhs_params = self.process_lhs(compiler, connection)
        values = list(self.rhs)
        marks = ", ".join(["%s"] * len(values))
        return f"{lhs} IN ({marks})", [*lhs_params, *values]

    def as_postgresql(self, compiler: Any, connection: Any) -> tuple[str, list[Any]]:
        lhs, lhs_params = self.process_lhs(compiler, connection)
        return f"{lhs} = ANY(%s::text[])", [*lhs_params, list(self.rhs)]


OutboxEvent._meta.get_field("queue_name").register_instance_lookup(AnyOf)


class OutboxWorker(models.Model):
    """A running worker process, so operators can see which are alive."""

    worker_id = models.CharField(max_length=200, unique=True)
    hostname = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    started_at = models.DateTimeField(db_default=Now())
    last_seen_at = models.DateTimeField(db_default=Now())

    class Meta:
        verbose_name = "outbox worker"
        ordering = ("worker_id",)

    def __str__(self) -> str:
        return self.worker_id


class OutboxActivity(models.Model):
    """What the workers recorded in one minute: the admin's chart of the last hour.

    Each worker adds the events it completed and failed, and the ready
    backlog it counted, at every heartbeat (outbox.activity).
    """

    minute = models.DateTimeField(primary_key=True)
    completed = models.PositiveBigIntegerField(default=0)
    failed = models.PositiveBigIntegerField(default=0)
    #: The ready events last counted in the minute (capped); NULL: none was.
    ready = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        verbose_name = "outbox activity"
        verbose_name_plural = "outbox activity"
        ordering = ("minute",)

    def __str__(self) -> str:
        return self.minute.isoformat()
