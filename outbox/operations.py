"""Operators' actions on events: retry now and discard. The admin calls these.

Neither action touches an event that is processing: its worker may be running
the handler right now. Re-opening or ending a keyed event changes its key's
queue, so both take the key's lock and lock the key's unfinished events first
(outbox.ordering), in short transactions of at most CHUNK events each.
"""

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from django.db import router, transaction
from django.db.models import QuerySet
from django.utils import timezone

from outbox import ordering
from outbox.models import OutboxEvent, Status
from outbox.publishing import notify_workers

logger = logging.getLogger(__name__)

#: Events changed per transaction; a bigger selection takes several.
CHUNK = 500

LIVE_LEASE = "processing under a live lease"
EXPIRED_LEASE = "processing with an expired lease (a worker will rescue it)"
COMPLETED = "completed"
DISCARDED = "discarded"
NOT_RETRYING = "pending and not waiting for a retry"
KEY_BUSY = "a later event of its key is processing"


@dataclass
class OperationResult:
    """The events an operation changed, and why it skipped the others."""

    changed: list[int] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)

    @property
    def skipped_count(self) -> int:
        return sum(self.skipped.values())

    def describe_skipped(self) -> str:
        """Return the skipped counts as "2 completed, 1 discarded"."""
        return ", ".join(
            f"{count} {reason}" for reason, count in sorted(self.skipped.items())
        )


#: Told, inside each chunk's transaction, the ids that chunk changed: an
#: audit trail written with the change, so a request killed halfway leaves
#: every change it committed recorded (the admin writes its log so).
Audit = Callable[[list[int]], None]


def retry_events(
    events: QuerySet[OutboxEvent] | Iterable[int],
    *,
    actor: str,
    using: str | None = None,
    audit: Audit | None = None,
) -> OperationResult:
    """Make failed events, and events waiting for a retry, pending now.

    Each gets a fresh attempt budget; its history is kept, with the retry
    added. Discarded and completed events are skipped, and so is a keyed event
    while a later event of its key is processing (it could not run first).
    """
    using = using or router.db_for_write(OutboxEvent)
    result = OperationResult()

    def retry(event: OutboxEvent) -> str | None:
        reason = _retry_refusal(event)
        if reason is None and event.key and not ordering.rejoin(event, using):
            reason = KEY_BUSY
        if reason is None:
            event.reopen(actor=actor)
        return reason

    for chunk in _chunks(_ids(events)):
        with transaction.atomic(using=using):
            changed_before = len(result.changed)
            _apply(_lock(chunk, using), retry, result)
            if len(result.changed) > changed_before:
                notify_workers(using)
                if audit is not None:
                    audit(result.changed[changed_before:])
    _log("retried", result)
    return result


def discard_events(
    events: QuerySet[OutboxEvent] | Iterable[int],
    *,
    actor: str,
    using: str | None = None,
    audit: Audit | None = None,
) -> OperationResult:
    """End pending and failed events for good, recording who and when.

    A discarded event is failed, never runs again and is never retried; the
    next event of its key becomes claimable.
    """
    using = using or router.db_for_write(OutboxEvent)
    result = OperationResult()
    heads_gone: set[ordering.Lane] = set()

    def discard(event: OutboxEvent) -> str | None:
        reason = _discard_refusal(event)
        if reason is None:
            if event.key and event.status == Status.PENDING:
                heads_gone.add(ordering.lane_of(event))
            event.discard(actor=actor)
        return reason

    for chunk in _chunks(_ids(events)):
        with transaction.atomic(using=using):
            heads_gone.clear()
            changed_before = len(result.changed)
            _apply(_lock(chunk, using), discard, result)
            if audit is not None and len(result.changed) > changed_before:
                audit(result.changed[changed_before:])
            # The lane's head is its earliest unfinished event: if that was
            # the discarded one, the next becomes claimable (and workers are
            # told, as no insert will tell them).
            if ordering.promote_heads(heads_gone, using):
                notify_workers(using)
    _log("discarded", result)
    return result


def _log(action: str, result: OperationResult) -> None:
    if result.changed:
        logger.info(
            "outbox events %s by an operator: changed=%d skipped=%d",
            action,
            len(result.changed),
            result.skipped_count,
            extra={"changed": len(result.changed), "skipped": result.skipped_count},
        )


def _retry_refusal(event: OutboxEvent) -> str | None:
    if event.status == Status.PENDING and event.attempts == 0:
        return NOT_RETRYING
    return _discard_refusal(event)


def _discard_refusal(event: OutboxEvent) -> str | None:
    if event.status == Status.COMPLETED:
        return COMPLETED
    if event.status == Status.PROCESSING:
        # The web server's clock: both cases are skipped, only the reason
        # given to the operator depends on it.
        live = event.locked_until is not None and event.locked_until > timezone.now()
        return LIVE_LEASE if live else EXPIRED_LEASE
    if event.discarded_at is not None:
        return DISCARDED
    return None


def _apply(
    rows: list[OutboxEvent],
    change: Callable[[OutboxEvent], str | None],
    result: OperationResult,
) -> None:
    for event in rows:
        reason = change(event)
        if reason is None:
            result.changed.append(event.pk)
        else:
            result.skipped[reason] += 1


def _lock(ids: list[int], using: str) -> list[OutboxEvent]:
    """Lock the events, their keys and their keys' queues; return the events.

    The key locks come first, as publish() takes them, then the rows in id
    order. Rows a claim holds are waited for and seen as it committed them.
    """
    events = OutboxEvent.objects.using(using).filter(pk__in=ids)
    keys = sorted(set(events.exclude(key="").values_list("key", flat=True)))
    ordering.lock_keys(keys, using)
    ordering.lock_unfinished(keys, using)
    return list(events.order_by("id").select_for_update())


def _ids(events: QuerySet[OutboxEvent] | Iterable[int]) -> list[int]:
    if isinstance(events, QuerySet):
        return sorted(events.order_by().values_list("pk", flat=True).distinct())
    return sorted(set(events))


def _chunks(ids: list[int]) -> Iterator[list[int]]:
    for start in range(0, len(ids), CHUNK):
        yield ids[start : start + CHUNK]
