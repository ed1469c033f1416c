import logging
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections, router

from outbox import metrics
from outbox.conf import check_queue_name, check_worker_id, get_settings
from outbox.management.arguments import port_number, positive_int, positive_seconds
from outbox.models import OutboxEvent
from outbox.runner import Runner, RunOptions
from outbox.worker import Worker

VERBOSITY_LEVELS = {0: logging.WARNING, 1: logging.INFO}


class Command(BaseCommand):
    help = "Run an outbox worker: claim events, run their handlers, until stopped."

    def add_arguments(self, parser: CommandParser) -> None:
        settings = get_settings()
        parser.add_argument(
            "--batch-size",
            type=positive_int,
            default=settings.batch_size,
            help="Events claimed per batch (default: %(default)r).",
        )
        parser.add_argument(
            "--concurrency",
            type=positive_int,
            default=settings.concurrency,
            help="Handlers in flight at once, each in a thread with its own "
            "database connection; 1 on SQLite (default: %(default)r).",
        )
        parser.add_argument(
            "--poll-ms",
            type=positive_int,
            default=settings.poll_ms,
            help="Idle poll interval, behind LISTEN/NOTIFY (default: %(default)r).",
        )
        parser.add_argument(
            "--stuck-timeout-ms",
            type=positive_int,
            default=settings.stuck_timeout_ms,
            help="Lease of a claimed event (default: %(default)r).",
        )
        parser.add_argument(
            "--worker-id",
            default=settings.default_worker_id,
            help="Name recorded on claimed events (default: <host>-<pid>).",
        )
        parser.add_argument(
            "--queue",
            action="append",
            dest="queues",
            metavar="NAME",
            default=[],
            help="Claim only events of this queue (repeatable; default: every "
            "queue). publish() and tasks without a queue_name use 'default'.",
        )
        parser.add_argument(
            "--metrics-port",
            type=port_number,
            default=settings.metrics_port,
            help="Serve Prometheus metrics on this port at /metrics "
            "(default: OUTBOX_METRICS_PORT, else off).",
        )
        parser.add_argument(
            "--drain",
            action="store_true",
            help="Exit 0 once no event is ready (default: run until stopped).",
        )
        parser.add_argument(
            "--max-events",
            type=positive_int,
            default=None,
            help="Exit 0 after claiming this many events (default: no limit).",
        )
        parser.add_argument(
            "--shutdown-timeout",
            type=positive_seconds,
            default=30.0,
            help="Seconds the handler in flight may take after SIGTERM before the "
            "worker exits non-zero (default: %(default)r).",
        )

    def handle(
        self,
        *,
        batch_size: int,
        concurrency: int,
        poll_ms: int,
        stuck_timeout_ms: int,
        worker_id: str,
        queues: list[str],
        metrics_port: int | None,
        drain: bool,
        max_events: int | None,
        shutdown_timeout: float,
        verbosity: int,
        **options: Any,
    ) -> None:
        if not worker_id.strip():
            raise CommandError("--worker-id must not be empty.")
        try:
            # Every claim writes it to a varchar(200): one too long would
            # fail every turn, not once.
            check_worker_id(worker_id, name="--worker-id")
            for queue in queues:
                check_queue_name(queue, name="--queue")
        except ValueError as error:
            raise CommandError(str(error)) from None
        vendor = connections[router.db_for_write(OutboxEvent)].vendor
        if concurrency > 1 and vendor == "sqlite":
            raise CommandError(
                f"--concurrency {concurrency} needs PostgreSQL: on SQLite writers "
                "take turns, so use 1."
            )
        logger = logging.getLogger("outbox")
        logger.setLevel(VERBOSITY_LEVELS.get(verbosity, logging.DEBUG))
        if not logger.handlers and not logging.getLogger().handlers:
            logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s %(message)s")
        if metrics_port is not None and not metrics.available():
            raise CommandError(
                "--metrics-port needs prometheus-client: install the 'metrics' extra."
            )
        settings = get_settings()
        worker = Worker(
            worker_id=worker_id,
            batch_size=batch_size,
            concurrency=concurrency,
            stuck_timeout_ms=stuck_timeout_ms,
            queues=queues,
            settings=settings,
            metrics=metrics.WorkerMetrics() if metrics_port is not None else None,
        )
        runner = Runner(
            worker,
            RunOptions(
                poll_ms=poll_ms,
                drain=drain,
                max_events=max_events,
                shutdown_timeout=shutdown_timeout,
                listen=settings.listen,
            ),
        )
        if isinstance(worker.metrics, metrics.WorkerMetrics):
            self._serve(worker, metrics_port)
        status = runner.run()
        if status:
            raise SystemExit(status)

    def _serve(self, worker: Worker, port: int | None) -> None:
        """Serve the worker's metrics; a port taken is a CommandError."""
        assert isinstance(worker.metrics, metrics.WorkerMetrics)  # noqa: S101
        assert port is not None  # noqa: S101 - the metrics were made for it
        try:
            served = worker.metrics.serve(port)
        except OSError as error:
            raise CommandError(
                f"--metrics-port {port}: {error.strerror or error}"
            ) from None
        logging.getLogger("outbox.runner").info(
            "outbox worker metrics on port %d at /metrics",
            served,
            extra={"worker_id": worker.worker_id, "metrics_port": served},
        )
