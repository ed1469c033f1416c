"""Retention: delete finished events older than a cutoff, in small batches.

Only completed events (by completed_at) and, when asked, failed ones (by
created_at) are deleted; pending and processing events never are. Each batch
is its own short transaction that skips rows another pruner holds, so
pruning never blocks workers or a second pruner for long.
"""

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from django.db import router, transaction
from django.db.models import QuerySet
from django.utils import timezone

from outbox.models import OutboxEvent, Status

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
    found: dict[str, QuerySet[OutboxEvent]] = {
        # The primary key, oldest first: ids follow creation, so the oldest
        # completed events come first, and no index on completed_at has to
        # be written by every completion.
        Status.COMPLETED: events.filter(
            status=Status.COMPLETED, completed_at__lt=cutoff
        ).order_by("id"),
    }
    if include_failed:
        # outbox_status_idx: failed events, few next to the completed ones.
        found[Status.FAILED] = events.filter(
            status=Status.FAILED, created_at__lt=cutoff
        ).order_by("id")
    return found


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
        while max_batches is None or result.batches < max_batches:
            deleted = _delete_batch(selection, status, batch_size, using)
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
) -> int:
    with transaction.atomic(using=using):
        ids = list(
            selection.select_for_update(skip_locked=True).values_list("pk", flat=True)[
                :batch_size
            ]
        )
        if not ids:
            return 0
        # The status again: an operator may have retried a failed event
        # since it was selected.
        deleted, _ = (
            OutboxEvent.objects.using(using).filter(pk__in=ids, status=status).delete()
        )
    return deleted
