"""publish() and publish_many(): write events in the caller's transaction.

On PostgreSQL a trigger on the outbox table (migration 0005) sends NOTIFY
inside the inserting transaction: workers wake when it commits, once however
many events it wrote, and never for a transaction that rolls back.
"""

import uuid
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.db import IntegrityError, connections, router, transaction
from django.utils import timezone

from outbox import deliveries, ordering, tracing
from outbox.conf import OutboxSettings, check_queue_name, get_settings
from outbox.deliveries import Delivery
from outbox.metrics import PublishMetrics, publish_metrics
from outbox.models import DEFAULT_QUEUE, OutboxEvent
from outbox.registry import get_handler, subscribers
from outbox.storable import check_text, encode_json

#: Rows per INSERT statement in publish_many().
INSERT_CHUNK = 1000
#: Payload per INSERT statement in publish_many(), in bytes of JSON: a
#: statement's rows travel as one jsonb document, which PostgreSQL caps at
#: 256 MiB, and the client holds the statement in memory twice.
INSERT_BYTES = 16 * 2**20
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

    def build(self) -> list[Delivery]:
        """Validate the event and return its deliveries, one per subscriber.

        The deliveries share the event's UUID; the unnamed handler's comes
        first. Everything PostgreSQL would refuse is refused here, before the
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
        if self.payload is None:
            raise ValueError(
                "publish(payload=...) is None; an event without data publishes {}."
            )
        payload_json = encode_json(
            self.payload,
            name="publish(payload=...)",
            max_bytes=settings.max_payload_bytes,
        )
        available_at = self.available_at
        if isinstance(available_at, datetime) and timezone.is_aware(available_at):
            # In UTC: PostgreSQL refuses offsets Python allows (beyond 15:59,
            # or with a fraction of a second).
            available_at = available_at.astimezone(UTC)
        event_uuid = uuid.uuid4()
        trace_context = tracing.current_context()
        return [
            Delivery(
                uuid=event_uuid,
                event_type=self.event_type,
                subscriber=subscriber,
                payload=self.payload,
                payload_json=payload_json,
                key=self.key or "",
                idempotency_key=self.idempotency_key,
                queue_name=self.queue or DEFAULT_QUEUE,
                max_attempts=self.max_attempts
                or _default_max_attempts(self.event_type, subscriber, settings),
                available_at=available_at,
                trace_context=trace_context,
            )
            for subscriber in subscribers(self.event_type)
        ]


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
    rows = _build(
        NewEvent(
            event_type, payload, key, idempotency_key, available_at, max_attempts, queue
        ),
        counted,
    )
    first = rows[0]
    using = router.db_for_write(OutboxEvent)
    # A plain event needs no transaction of its own: in autocommit mode its
    # INSERT is one. A key's lock must cover the insert, so a keyed event
    # outside the caller's transaction gets one.
    with _in_transaction(using) if first.key else nullcontext():
        if first.idempotency_key is not None:
            existing = _existing_events([first.idempotency_key], using)
            if existing:
                return existing[first.idempotency_key]
        ordering.join_queues(rows, using)
        event = _insert(rows, using)
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
            [rows[0].idempotency_key for rows in built if rows[0].idempotency_key],
            using,
        )
        fresh: list[list[Delivery]] = []
        repeats: set[str] = set()
        for rows in built:
            idempotency_key = rows[0].idempotency_key
            if idempotency_key is None:
                fresh.append(rows)
            elif idempotency_key not in stored and idempotency_key not in repeats:
                repeats.add(idempotency_key)
                fresh.append(rows)
        # Every key at once, in one order, so two batches cannot deadlock.
        ordering.lock_keys({rows[0].key for rows in fresh if rows[0].key}, using)
        written = _insert_many(fresh, using)
    if counted is not None:
        for rows in fresh:
            counted.wrote(rows[0].event_type)
    published = iter(written)
    returned = []
    for rows in built:
        idempotency_key = rows[0].idempotency_key
        if idempotency_key is None or idempotency_key not in stored:
            event = next(published)
            if idempotency_key is not None:
                stored[idempotency_key] = event
        else:
            event = stored[idempotency_key]
        returned.append(event)
    return returned


def _build(new: NewEvent, counted: PublishMetrics | None) -> list[Delivery]:
    """Build the event's deliveries, counting a refusal in the process's metrics."""
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


def _insert(rows: list[Delivery], using: str) -> OutboxEvent:
    """Insert one event's deliveries with one statement; return the first.

    An event whose idempotency key a concurrent publisher took meanwhile
    returns that publisher's event instead, and writes nothing.
    """
    idempotency_key = rows[0].idempotency_key
    if idempotency_key is None:
        return deliveries.insert(rows, using)[0]
    try:
        # A savepoint, so losing a race with a concurrent publisher of the
        # same idempotency key leaves the caller's transaction usable.
        with transaction.atomic(using=using):
            return deliveries.insert(rows, using)[0]
    except IntegrityError:
        existing = _existing_events([idempotency_key], using)
        if not existing:
            raise
        return existing[idempotency_key]


def _insert_many(events: list[list[Delivery]], using: str) -> list[OutboxEvent]:
    """Insert the events' deliveries, a chunk (_chunks()) per statement.

    Call with the events' keys locked. Return each event's first delivery;
    an event that lost an idempotency race, the winner's. Each chunk is
    queued up on its own, after the chunks before it are in the table: a
    chunk that lost a race inserts only some of its rows.
    """
    guarded = any(rows[0].idempotency_key for rows in events)
    written: list[OutboxEvent] = []
    for chunk in _chunks(events):
        flat = [row for rows in chunk for row in rows]
        ordering.queue_up(flat, using)
        try:
            with transaction.atomic(using=using) if guarded else nullcontext():
                saved = deliveries.insert(flat, using)
        except IntegrityError:
            # A concurrent publisher took one of the idempotency keys: publish
            # this chunk event by event, as publish() would, each resolving
            # its own conflict and seeing the ones before it.
            for rows in chunk:
                ordering.queue_up(rows, using)
                written.append(_insert(rows, using))
            continue
        # Each event's first delivery: the rows are in the chunk's order.
        first = 0
        for rows in chunk:
            written.append(saved[first])
            first += len(rows)
    return written


def _chunks(events: list[list[Delivery]]) -> Iterable[list[list[Delivery]]]:
    """Split the events into chunks, each whole, of at most INSERT_CHUNK rows
    and INSERT_BYTES of payload (unless one event alone is more)."""
    chunk: list[list[Delivery]] = []
    size = weight = 0
    for rows in events:
        payload = len(rows[0].payload_json) * len(rows)
        if chunk and (
            size + len(rows) > INSERT_CHUNK or weight + payload > INSERT_BYTES
        ):
            yield chunk
            chunk, size, weight = [], 0, 0
        chunk.append(rows)
        size += len(rows)
        weight += payload
    if chunk:
        yield chunk


def _existing_events(idempotency_keys: list[str], using: str) -> dict[str, OutboxEvent]:
    if not idempotency_keys:
        return {}
    found = OutboxEvent.objects.using(using).filter(
        idempotency_key__in=idempotency_keys
    )
    events: dict[str, OutboxEvent] = {}
    # An event's first delivery, as publish() returns it.
    for event in found.order_by("subscriber"):
        if event.idempotency_key:
            events.setdefault(event.idempotency_key, event)
    return events


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


def _default_max_attempts(
    event_type: str, subscriber: str, settings: OutboxSettings
) -> int:
    registered = get_handler(event_type, subscriber)
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
