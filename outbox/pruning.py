"""Retention: delete finished events older than a cutoff, in small batches.

Only completed events (by completed_at) and, when asked, failed ones (by
failed_at) are deleted; pending and processing events never are. A failed
event is aged from when it failed, not from its creation: an operator who
retried an old event that then failed again gets the whole retention period
to look at it, and an event that waited long for its attempts is not deleted
the moment it fails. One that failed before failed_at existed (migration
0009) has none and is aged by created_at. Each batch
is its own short transaction that skips rows another pruner holds, so
pruning never blocks workers or a second pruner for long.

No index holds completed_at (every completion would write to it): the
pruner walks the primary key, which follows creation, from the oldest id,
and stops at the first event created since the cutoff. An event completes
after it is created, so none older than the cutoff lies past that horizon,
and a run reads the old events, not the table (docs/architecture.md,
"Plans").
"""

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import router, transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from outbox.models import OutboxEvent, Status
from outbox.statements import in_index_order

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 1000
DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_DURATION = re.compile(r"(\d+)([smhd])")


@dataclass
class PruneResult:
    completed: int = 0
    failed: int = 0
    batches: int = 0

    @property
    def total(self) -> int:
        return self.completed + self.failed


def parse_duration(text: str) -> timedelta:
    """Return the timedelta of "30m", "12h" or "7d"; raise ValueError otherwise."""
    match = _DURATION.fullmatch(text.strip())
    if match is None or int(match[1]) == 0:
        raise ValueError(
            f"{text!r} is not a duration: expected a positive number followed by "
            "s, m, h or d, such as 30m, 12h or 7d"
        )
    return timedelta(**{DURATION_UNITS[match[2]]: int(match[1])})


def prunable(
    *,
    older_than: timedelta | None,
    include_failed: bool = False,
    failed_older_than: timedelta | None = None,
    using: str | None = None,
) -> dict[str, QuerySet[OutboxEvent]]:
    """Return the events prune() would delete, by status, oldest first.

    Completed events that completed more than older_than ago (None: none);
    failed events that failed more than failed_older_than ago, or older_than
    ago with include_failed (neither: none).
    """
    using = using or router.db_for_write(OutboxEvent)
    now = timezone.now()
    events = OutboxEvent.objects.using(using)
    found: dict[str, QuerySet[OutboxEvent]] = {}
    if older_than is not None:
        found[Status.COMPLETED] = _completed(events, now - older_than, using)
    failed_age = failed_older_than or (older_than if include_failed else None)
    if failed_age is not None:
        found[Status.FAILED] = _failed(events, now - failed_age)
    return found


def _completed(
    events: QuerySet[OutboxEvent], cutoff: datetime, using: str
) -> QuerySet[OutboxEvent]:
    completed = events.filter(status=Status.COMPLETED, completed_at__lt=cutoff)
    horizon = _horizon(events, cutoff, using)
    if horizon is not None:
        completed = completed.filter(pk__lt=horizon)
    return completed.order_by("id")


def _failed(events: QuerySet[OutboxEvent], cutoff: datetime) -> QuerySet[OutboxEvent]:
    # outbox_status_idx: failed events, few next to the completed ones.
    failed_before = Q(failed_at__lt=cutoff) | Q(
        failed_at__isnull=True, created_at__lt=cutoff
    )
    return events.filter(failed_before, status=Status.FAILED).order_by("id")


def count_prunable(
    *,
    older_than: timedelta | None,
    include_failed: bool = False,
    failed_older_than: timedelta | None = None,
    using: str | None = None,
) -> dict[str, int]:
    """How many events prune() would delete now, by status (a dry run)."""
    using = using or router.db_for_write(OutboxEvent)
    selections = prunable(
        older_than=older_than,
        include_failed=include_failed,
        failed_older_than=failed_older_than,
        using=using,
    )
    with in_index_order(using):
        return {status: events.count() for status, events in selections.items()}


def _horizon(events: QuerySet[OutboxEvent], cutoff: datetime, using: str) -> int | None:
    """The id of the oldest event created at or after cutoff, if any.

    Ids follow creation up to the length of a transaction (created_at is
    when it began): an event dated before the cutoff but numbered after a
    newer one lies past the horizon, and is pruned by a later run.

    Planned from statistics taken when every event was old, PostgreSQL
    expects none to match and reads the BRIN index on created_at instead,
    every page since the last VACUUM: hence in_index_order().
    """
    with in_index_order(using):
        return (
            events.filter(created_at__gte=cutoff)
            .order_by("id")
            .values_list("pk", flat=True)
            .first()
        )


def prune(
    *,
    older_than: timedelta | None,
    include_failed: bool = False,
    failed_older_than: timedelta | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_batches: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    using: str | None = None,
) -> PruneResult:
    """Delete completed (and failed) events past their age, in batches.

    The ages are read as prunable() reads them. progress(status,
    deleted_in_batch, deleted_in_total) is called after each batch.
    max_batches bounds the work of one call (the worker's schedule).
    """
    using = using or router.db_for_write(OutboxEvent)
    result = PruneResult()
    selections = prunable(
        older_than=older_than,
        include_failed=include_failed,
        failed_older_than=failed_older_than,
        using=using,
    )
    for status, selection in selections.items():
        # Past the ids of the batches already deleted: their index entries
        # stay until VACUUM, and each batch would walk them again.
        after = 0
        while max_batches is None or result.batches < max_batches:
            deleted, after = _delete_batch(
                selection.filter(pk__gt=after), status, batch_size, using
            )
            if not deleted:
                break
            result.batches += 1
            if status == Status.COMPLETED:
                result.completed += deleted
            else:
                result.failed += deleted
            if progress is not None:
                progress(status, deleted, result.total)
            if deleted < batch_size:
                break
    if result.total:
        logger.info(
            "outbox pruned completed=%d failed=%d batches=%d",
            result.completed,
            result.failed,
            result.batches,
            extra={
                "pruned_completed": result.completed,
                "pruned_failed": result.failed,
            },
        )
    return result


def _delete_batch(
    selection: QuerySet[OutboxEvent], status: str, batch_size: int, using: str
) -> tuple[int, int]:
    """Delete one batch; return how many were deleted and the highest id seen."""
    with transaction.atomic(using=using):
        # Between the horizon and the ids already deleted, the primary key
        # is the plan in every state of the statistics: no help needed.
        ids = list(
            selection.select_for_update(skip_locked=True).values_list("pk", flat=True)[
                :batch_size
            ]
        )
        if not ids:
            return 0, 0
        # The status again: an operator may have retried a failed event
        # since it was selected.
        deleted, _ = (
            OutboxEvent.objects.using(using).filter(pk__in=ids, status=status).delete()
        )
    return deleted, ids[-1]
