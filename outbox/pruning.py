"""Retention: delete finished events older than a cutoff, in small batches.

Only completed events (by completed_at) and, when asked, failed ones (by
created_at) are deleted; pending and processing events never are. Each batch
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
from django.db.models import QuerySet
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
    *, older_than: timedelta, include_failed: bool = False, using: str | None = None
) -> dict[str, QuerySet[OutboxEvent]]:
    """Return the events older_than would delete, by status, oldest first."""
    using = using or router.db_for_write(OutboxEvent)
    cutoff = timezone.now() - older_than
    events = OutboxEvent.objects.using(using)
    completed = events.filter(status=Status.COMPLETED, completed_at__lt=cutoff)
    horizon = _horizon(events, cutoff, using)
    if horizon is not None:
        completed = completed.filter(pk__lt=horizon)
    found: dict[str, QuerySet[OutboxEvent]] = {
        Status.COMPLETED: completed.order_by("id")
    }
    if include_failed:
        # outbox_status_idx: failed events, few next to the completed ones.
        found[Status.FAILED] = events.filter(
            status=Status.FAILED, created_at__lt=cutoff
        ).order_by("id")
    return found


def count_prunable(
    *, older_than: timedelta, include_failed: bool = False, using: str | None = None
) -> dict[str, int]:
    """How many events prune() would delete now, by status (a dry run)."""
    using = using or router.db_for_write(OutboxEvent)
    selections = prunable(
        older_than=older_than, include_failed=include_failed, using=using
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
    older_than: timedelta,
    include_failed: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_batches: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    using: str | None = None,
) -> PruneResult:
    """Delete completed (and failed) events older than older_than, in batches.

    progress(status, deleted_in_batch, deleted_in_total) is called after
    each batch. max_batches bounds the work of one call (the worker's schedule).
    """
    using = using or router.db_for_write(OutboxEvent)
    result = PruneResult()
    selections = prunable(
        older_than=older_than, include_failed=include_failed, using=using
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
