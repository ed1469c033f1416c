import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from outbox.management.arguments import positive_int, seconds
from outbox.monitoring import OutboxStatus, collect_status

#: Exit status when a --fail-if-* threshold is exceeded.
THRESHOLD_EXCEEDED = 2


class Command(BaseCommand):
    help = (
        "Show outbox events per status, the lag of the oldest ready event and the "
        "live workers; exit 2 when a --fail-if-* threshold is exceeded."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--json", action="store_true", help="Print JSON (default: plain text)."
        )
        parser.add_argument(
            "--fail-if-lag",
            type=seconds,
            metavar="SECONDS",
            help="Exit 2 if the oldest ready event has waited longer than this "
            "(default: never).",
        )
        parser.add_argument(
            "--fail-if-failed",
            type=positive_int,
            metavar="N",
            help="Exit 2 if N or more events are failed and not discarded "
            "(default: never).",
        )

    def handle(
        self,
        *,
        json: bool,
        fail_if_lag: float | None,
        fail_if_failed: int | None,
        **options: Any,
    ) -> None:
        status = collect_status()
        self.stdout.write(_as_json(status) if json else _as_text(status))
        problems = []
        lag = status.lag.total_seconds() if status.lag is not None else 0.0
        if fail_if_lag is not None and lag > fail_if_lag:
            problems.append(
                f"the oldest ready event has waited {lag:.1f}s, more than "
                f"--fail-if-lag {fail_if_lag:g}"
            )
        failed = status.counts.failed_not_discarded
        if fail_if_failed is not None and failed >= fail_if_failed:
            problems.append(
                f"{failed} failed events (not discarded) reach --fail-if-failed "
                f"{fail_if_failed}"
            )
        if problems:
            raise CommandError("; ".join(problems) + ".", returncode=THRESHOLD_EXCEEDED)


def _as_json(status: OutboxStatus) -> str:
    return json.dumps(status.as_dict(), indent=2)


def _as_text(status: OutboxStatus) -> str:
    counts = status.counts
    completed = (
        str(counts.completed)
        if counts.completed_exact
        else f"about {counts.completed} (estimate)"
    )
    lag = (
        "no event is ready"
        if status.lag is None
        else f"{status.lag.total_seconds():.1f}s (oldest ready event)"
    )
    lines = [
        f"pending     {counts.pending}",
        f"processing  {counts.processing}",
        f"failed      {counts.failed} ({counts.discarded} discarded)",
        f"completed   {completed}",
        f"lag         {lag}",
        f"workers     {status.live_workers} live",
    ]
    named = [name for name in counts.by_subscriber if name]
    if named:
        # Fan-out: the counts above are deliveries, one per subscriber.
        width = max(len(name) for name in [*named, "(unnamed)"])
        lines.insert(4, "deliveries by subscriber (pending / processing / failed):")
        lines[5:5] = [
            f"  {name or '(unnamed)':<{width}}  {n['pending']} / {n['processing']} / "
            f"{n['failed']}"
            for name, n in counts.by_subscriber.items()
        ]
    lines += [
        f"  {worker.worker_id}  {worker.hostname} pid {worker.pid}  "
        f"last heartbeat {worker.last_seen_at:%Y-%m-%d %H:%M:%S %Z}  "
        f"{'alive' if worker.alive else 'dead'}"
        for worker in status.workers
    ]
    return "\n".join(lines)
