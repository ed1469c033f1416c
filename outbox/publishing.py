"""publish() and publish_many(): write events in the caller's transaction.

On PostgreSQL a trigger on the outbox table (migration 0005) sends NOTIFY
inside the inserting transaction: workers wake when it commits, once however
many events it wrote, and never for a transaction that rolls back.
"""

from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import IntegrityError, connections, router, transaction

from outbox import ordering, tracing
from outbox.conf import OutboxSettings, check_queue_name, get_settings
from outbox.metrics import PublishMetrics, publish_metrics
from outbox.models import DEFAULT_QUEUE, OutboxEvent
from outbox.registry import get_handler
from outbox.storable import check_text, encode_json

#: Rows per INSERT statement in publish_many().
INSERT_CHUNK = 1000
#: The largest max_attempts the column holds (an integer on PostgreSQL).
MAX_ATTEMPTS_LIMIT = 2**31 - 1
#: The text fields' column lengths, from the model: one home for the limit.
_LENGTHS = {
    field.name: field.max_length or 0
    for field in OutboxEvent._meta.concrete_fields
    if field.name in ("event_type", "key", "idempotency_key")
}


@dataclass(frozen=True)
class NewEvent:
    """An event to publish with publish_many(); the fields mirror publish()."""

    event_type: str
    payload: Any
    key: str | None = None
    idempotency_key: str | None = None
    available_at: datetime | None = None
    max_attempts: int | None = None
    queue: str | None = None

    def build(self) -> OutboxEvent:
        """Validate the event and return it as an unsaved row.

        Everything PostgreSQL would refuse is refused here, before the
        database is touched, with the field and the limit named: an error
        raised inside the INSERT would doom the caller's transaction.
        """
        settings = get_settings()
        if not self.event_type:
            raise ValueError("publish() needs a non-empty event type.")
        _check_text("event_type", self.event_type)
        if self.key is not None:
            _check_text("key", self.key)
        if self.idempotency_key is not None:
            _check_text("idempotency_key", self.idempotency_key)
        if self.max_attempts is not None:
            _check_max_attempts(self.max_attempts)
        if self.queue is not None:
            check_queue_name(self.queue, name="publish(queue=...)")
        # Encoded once, for its checks only: JSONField encodes it again to
        # save, and handing it the text would mean a field of our own.
        encode_json(
            self.payload,
            name="publish(payload=...)",
            max_bytes=settings.max_payload_bytes,
        )
        event = OutboxEvent(
            event_type=self.event_type,
            payload=self.payload,
            key=self.key or "",
            idempotency_key=self.idempotency_key,
            max_attempts=self.max_attempts
            or _default_max_attempts(self.event_type, settings),
            queue_name=self.queue or DEFAULT_QUEUE,
            trace_context=tracing.current_context(),
        )
        if self.available_at is not None:
            event.available_at = self.available_at
        return event


def publish(
    event_type: str,
    payload: Any,
    *,
    key: str | None = None,
    idempotency_key: str | None = None,
    available_at: datetime | None = None,
    max_attempts: int | None = None,
    queue: str | None = None,
) -> OutboxEvent:
    """Write an event in the caller's transaction and return it.

    The row commits or rolls back with the caller's transaction. What the
    database cannot store raises here, before any query, naming the field:
    TypeError for a payload that is not JSON-serialisable or a field of the
    wrong type, ValueError for a field over its column's 200 characters,
    text with a NUL character or a lone surrogate, NaN or Infinity in the
    payload, or a payload over OUTBOX_MAX_PAYLOAD_BYTES. Publishing an
    idempotency_key that exists returns the existing event and writes nothing.
    Events with the same key are handled one at a time, in publish order.
    A worker started with --queue claims only its queues' events; without
    one, the event is in the queue named "default".
    """
    counted = publish_metrics()
    event = _build(
        NewEvent(
            event_type, payload, key, idempotency_key, available_at, max_attempts, queue
        ),
        counted,
    )
    using = router.db_for_write(OutboxEvent)
    # A plain event needs no transaction of its own: in autocommit mode its
    # INSERT is one. A key's lock must cover the insert, so a keyed event
    # outside the caller's transaction gets one.
    with _in_transaction(using) if event.key else nullcontext():
        if event.idempotency_key is not None:
            existing = _existing_events([event.idempotency_key], using)
            if existing:
                return existing[event.idempotency_key]
        if event.key:
            ordering.join_queue(event, using)
        event = _insert_one(event, using)
    if counted is not None:
        counted.wrote(event.event_type)
    return event


def publish_many(events: Iterable[NewEvent]) -> list[OutboxEvent]:
    """Write many events with one INSERT per thousand; return them in order.

    The rules of publish() hold for each event: validation before any write,
    idempotency keys (an existing one returns the existing event; a repeat in
    the batch returns the first), and per-key publish order.
    """
    counted = publish_metrics()
    built = [_build(new, counted) for new in events]
    using = router.db_for_write(OutboxEvent)
    with _in_transaction(using):
        stored = _existing_events(
            [event.idempotency_key for event in built if event.idempotency_key], using
        )
        fresh: list[OutboxEvent] = []
        for event in built:
            if event.idempotency_key is None:
                fresh.append(event)
            elif event.idempotency_key not in stored:
                stored[event.idempotency_key] = event
                fresh.append(event)
        ordering.join_queues(fresh, using)
        _insert_many(fresh, using)
        for event in fresh:
            if event.idempotency_key:
                stored[event.idempotency_key] = event
    if counted is not None:
        for event in fresh:
            counted.wrote(event.event_type)
    return [
        stored[event.idempotency_key] if event.idempotency_key else event
        for event in built
    ]


def _build(new: NewEvent, counted: PublishMetrics | None) -> OutboxEvent:
    """Build the event, counting a refusal in the process's metrics."""
    try:
        return new.build()
    except (TypeError, ValueError) as error:
        if counted is not None:
            counted.failed(new.event_type, error)
        raise


def _in_transaction(using: str) -> Any:
    """Reuse the caller's transaction, or open one so key locks cover the insert."""
    if connections[using].in_atomic_block:
        return nullcontext()
    return transaction.atomic(using=using)


def _insert_one(event: OutboxEvent, using: str) -> OutboxEvent:
    if event.idempotency_key is None:
        event.save(force_insert=True, using=using)
    else:
        try:
            # A savepoint, so losing a race with a concurrent publisher of
            # the same idempotency key leaves the caller's transaction usable.
            with transaction.atomic(using=using):
                event.save(force_insert=True, using=using)
        except IntegrityError:
            existing = _existing_events([event.idempotency_key], using)
            if not existing:
                raise
            return existing[event.idempotency_key]
    if not isinstance(event.waiting, bool):
        # Django before 6.0 does not return expression values from an INSERT.
        event.refresh_from_db(fields=["waiting"])
    return event


def _insert_many(events: list[OutboxEvent], using: str) -> None:
    """Insert the events, replacing any that lost an idempotency race."""
    guarded = any(event.idempotency_key for event in events)
    for start in range(0, len(events), INSERT_CHUNK):
        chunk = events[start : start + INSERT_CHUNK]
        if not guarded:
            OutboxEvent.objects.using(using).bulk_create(chunk)
            continue
        try:
            with transaction.atomic(using=using):
                OutboxEvent.objects.using(using).bulk_create(chunk)
        except IntegrityError:
            # A concurrent publisher took one of the idempotency keys: publish
            # this chunk one by one, as publish() would, each resolving its
            # own conflict and seeing the ones before it.
            for index, event in enumerate(chunk):
                event.pk = None
                if event.key:
                    ordering.join_queue(event, using)
                events[start + index] = _insert_one(event, using)


def _existing_events(idempotency_keys: list[str], using: str) -> dict[str, OutboxEvent]:
    if not idempotency_keys:
        return {}
    found = OutboxEvent.objects.using(using).filter(
        idempotency_key__in=idempotency_keys
    )
    return {event.idempotency_key: event for event in found if event.idempotency_key}


def _check_text(field: str, value: object) -> None:
    check_text(value, name=f"publish({field}=...)", limit=_LENGTHS[field])


def _check_max_attempts(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"publish(max_attempts=...) must be an integer, not {type(value).__name__}."
        )
    if value < 1:
        raise ValueError("publish(max_attempts=...) must be at least 1.")
    if value > MAX_ATTEMPTS_LIMIT:
        raise ValueError(
            f"publish(max_attempts=...) is {value}; the limit is {MAX_ATTEMPTS_LIMIT}."
        )


def _default_max_attempts(event_type: str, settings: OutboxSettings) -> int:
    registered = get_handler(event_type)
    if registered is not None and registered.max_attempts is not None:
        return registered.max_attempts
    return settings.max_attempts


def notify_workers(using: str) -> None:
    """Wake listening workers when the current transaction commits.

    Inserting events needs no call: a trigger on the outbox table notifies
    (see migration 0005). Use this after making existing events ready, as an
    operator's retry does.
    """
    connection = connections[using]
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, '')", [OutboxEvent._meta.db_table])
