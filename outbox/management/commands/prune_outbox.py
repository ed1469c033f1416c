from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.utils import timezone

from outbox.management.arguments import duration, positive_int
from outbox.pruning import DEFAULT_BATCH_SIZE, count_prunable, prune


class Command(BaseCommand):
    help = (
        "Delete completed (and, with --include-failed, failed) outbox events older "
        "than a cutoff, in small batches. Pending and processing events are never "
        "deleted."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--older-than",
            type=duration,
            required=True,
            help="Age of the events to delete: 30m, 12h, 7d (completed events by "
            "completion time, failed ones by the time they failed).",
        )
        parser.add_argument(
            "--include-failed",
            action="store_true",
            help="Also delete failed events (default: keep them for operators).",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Count what would be deleted and delete nothing.",
        )
        parser.add_argument(
            "--batch-size",
            type=positive_int,
            default=DEFAULT_BATCH_SIZE,
            help="Events deleted per transaction (default: %(default)r).",
        )

    def handle(
        self,
        *,
        older_than: timedelta,
        include_failed: bool,
        dry_run: bool,
        batch_size: int,
        **options: Any,
    ) -> None:
        cutoff = timezone.now() - older_than
        if dry_run:
            counts = count_prunable(
                older_than=older_than, include_failed=include_failed
            )
            for status, count in counts.items():
                self.stdout.write(
                    f"Would delete {count} {status} events older than "
                    f"{cutoff:%Y-%m-%d %H:%M:%S %Z}."
                )
            return

        def progress(status: str, deleted: int, total: int) -> None:
            self.stdout.write(f"Deleted {deleted} {status} events ({total} so far).")

        result = prune(
            older_than=older_than,
            include_failed=include_failed,
            batch_size=batch_size,
            progress=progress,
        )
        summary = f"Deleted {result.completed} completed"
        if include_failed:
            summary += f" and {result.failed} failed"
        self.stdout.write(
            self.style.SUCCESS(
                f"{summary} events older than {cutoff:%Y-%m-%d %H:%M:%S %Z} in "
                f"{result.batches} batches."
            )
        )
