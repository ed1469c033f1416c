"""Measure the outbox on PostgreSQL: publish, drain and latency.

    .venv/bin/python benchmarks/run.py [--events 10000] [--batch-size 32] [--json]

Creates a database of its own on the server of BENCHMARK_DATABASE_URL
(default: postgres://postgres@127.0.0.1:5432/postgres), migrates it, runs
each workload and drops the database. Commits are durable (the server's
synchronous_commit is left as it is, on by default). The drain and latency
workloads run the real `manage.py run_outbox_worker` processes.
"""

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SERVER = "postgres://postgres@127.0.0.1:5432/postgres"
PAYLOAD = {"invitation_id": 12345, "organization_id": 678}


@dataclass
class Measurement:
    workload: str
    events: int
    seconds: float
    notes: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--events", type=positive, default=10_000, help="(default: %(default)r)"
    )
    parser.add_argument(
        "--batch-size", type=positive, default=32, help="(default: %(default)r)"
    )
    parser.add_argument(
        "--latency-events",
        type=positive,
        default=500,
        help="events published 10 ms apart for the latency run (default: %(default)r)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON, not a table")
    options = parser.parse_args()
    server = os.environ.get("BENCHMARK_DATABASE_URL", DEFAULT_SERVER)
    name = f"outbox_bench_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        results = run(with_database(server, name), options)
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    report(results, as_json=options.json)


def run(database_url: str, options: argparse.Namespace) -> list[Measurement]:
    sys.path.insert(0, str(ROOT))
    os.environ["DATABASE_URL"] = database_url
    os.environ["DJANGO_SETTINGS_MODULE"] = "benchmarks.settings"
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", run_syncdb=True, verbosity=0)
    events, batch_size = options.events, options.batch_size
    return [
        *measure_publish(events),
        measure_drain(events, batch_size, processes=1),
        measure_drain(events, batch_size, processes=4),
        measure_latency(options.latency_events),
    ]


def measure_publish(events: int) -> list[Measurement]:
    from django.db import transaction

    from outbox import NewEvent, publish, publish_many
    from outbox.models import OutboxEvent

    def one_per_transaction() -> None:
        for _ in range(events):
            publish("benchmark.noop", PAYLOAD)

    def thousand_per_transaction() -> None:
        for start in range(0, events, 1000):
            with transaction.atomic():
                for _ in range(min(1000, events - start)):
                    publish("benchmark.noop", PAYLOAD)

    def many() -> None:
        for start in range(0, events, 1000):
            count = min(1000, events - start)
            publish_many(NewEvent("benchmark.noop", PAYLOAD) for _ in range(count))

    results = []
    for name, workload in [
        ("publish, one per transaction", one_per_transaction),
        ("publish, 1,000 per transaction", thousand_per_transaction),
        ("publish_many, 1,000 per call", many),
    ]:
        results.append(timed(name, events, workload))
        OutboxEvent.objects.all().delete()
    return results


def measure_drain(events: int, batch_size: int, *, processes: int) -> Measurement:
    """Drain no-op events with worker processes; rate from 10 % to 90 % done."""
    from django.db import connection

    from outbox import NewEvent, publish_many
    from outbox.models import OutboxEvent

    OutboxEvent.objects.all().delete()
    for start in range(0, events, 1000):
        count = min(1000, events - start)
        publish_many(NewEvent("benchmark.noop", PAYLOAD) for _ in range(count))
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE outbox_outboxevent")
    workers = [
        start_worker("--drain", "--batch-size", str(batch_size), "-v", "0")
        for _ in range(processes)
    ]
    marks: dict[float, float] = {}
    started = time.perf_counter()
    while len(marks) < 2:
        done = 1 - remaining() / events
        for mark in (0.1, 0.9):
            if done >= mark and mark not in marks:
                marks[mark] = time.perf_counter()
        time.sleep(0.005)
    for worker in workers:
        if worker.wait(timeout=120):
            raise RuntimeError("a benchmark worker failed")
    seconds = marks[0.9] - marks[0.1]
    return Measurement(
        f"drain, {processes} worker process{'es' if processes > 1 else ''}",
        int(events * 0.8),
        seconds,
        {"total_seconds_with_startup": time.perf_counter() - started},
    )


def remaining() -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM outbox_outboxevent WHERE status <> 'completed'"
        )
        return cursor.fetchone()[0]


def measure_latency(events: int) -> Measurement:
    """Commit to handler start while one worker idles at the default poll."""
    from django.db import transaction

    from benchmarks.models import HandlerStart
    from outbox import publish

    worker = start_worker("-v", "0")
    time.sleep(2)  # let it start and go idle
    committed: dict[str, float] = {}
    started = time.perf_counter()
    try:
        for _ in range(events):
            stamp: list[float] = []
            with transaction.atomic():
                # Registered before publish()'s wake-up, so it runs first,
                # right after COMMIT returns.
                transaction.on_commit(partial(stamp_now, stamp))
                event = publish("benchmark.clock", {})
            committed[str(event.uuid)] = stamp[0]
            time.sleep(0.01)
        deadline = time.monotonic() + 30
        while HandlerStart.objects.count() < events and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    latencies = sorted(
        (row.started_at - committed[str(row.event_uuid)]) * 1000
        for row in HandlerStart.objects.all()
    )
    quantiles = statistics.quantiles(latencies, n=100)
    return Measurement(
        "latency, commit to handler start",
        len(latencies),
        time.perf_counter() - started,
        {
            "p50_ms": quantiles[49],
            "p95_ms": quantiles[94],
            "p99_ms": quantiles[98],
            "max_ms": latencies[-1],
        },
    )


def stamp_now(stamps: list[float]) -> None:
    stamps.append(time.time())


def start_worker(*arguments: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # noqa: S603 - our own interpreter and script
        [sys.executable, "manage.py", "run_outbox_worker", *arguments],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "benchmarks.settings"},
    )


def timed(workload: str, events: int, function: Callable[[], object]) -> Measurement:
    started = time.perf_counter()
    function()
    return Measurement(workload, events, time.perf_counter() - started)


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def report(results: list[Measurement], *, as_json: bool) -> None:
    if as_json:
        rows = [
            {**asdict(result), "events_per_second": result.rate} for result in results
        ]
        print(json.dumps(rows, indent=2))  # noqa: T201 - the command's output
        return
    print(f"{'workload':<34} {'events':>8} {'seconds':>9} {'events/s':>10}  notes")  # noqa: T201
    for result in results:
        notes = "  ".join(f"{name}={value:.2f}" for name, value in result.notes.items())
        print(  # noqa: T201
            f"{result.workload:<34} {result.events:>8} {result.seconds:>9.3f} "
            f"{result.rate:>10,.0f}  {notes}"
        )


if __name__ == "__main__":
    main()
