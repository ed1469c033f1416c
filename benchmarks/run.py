"""Measure the outbox on PostgreSQL: publish and drain rates.

    .venv/bin/python benchmarks/run.py --events 10000

Creates a database of its own on the server of BENCHMARK_DATABASE_URL
(default: postgres://postgres@127.0.0.1:5432/postgres), migrates it, runs
each workload and drops the database. Commits are durable (the server's
synchronous_commit is left as it is, on by default).
"""

import argparse
import json
import os
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import psycopg

if TYPE_CHECKING:
    from outbox.worker import Worker

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SERVER = "postgres://postgres@127.0.0.1:5432/postgres"


@dataclass
class Measurement:
    workload: str
    events: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--events", type=positive, default=10_000, help="(default: %(default)r)"
    )
    parser.add_argument(
        "--batch-size", type=positive, default=32, help="(default: %(default)r)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON, not a table")
    options = parser.parse_args()
    server = os.environ.get("BENCHMARK_DATABASE_URL", DEFAULT_SERVER)
    name = f"outbox_bench_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        results = run(with_database(server, name), options.events, options.batch_size)
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    report(results, as_json=options.json)


def run(database_url: str, events: int, batch_size: int) -> list[Measurement]:
    sys.path.insert(0, str(ROOT))
    os.environ["DATABASE_URL"] = database_url
    os.environ["DJANGO_SETTINGS_MODULE"] = "benchmarks.settings"
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import transaction

    from outbox import NewEvent, publish, publish_many
    from outbox.models import OutboxEvent
    from outbox.worker import Worker

    call_command("migrate", verbosity=0)
    payload = {"invitation_id": 12345, "organization_id": 678}
    results = [
        timed(
            "publish, one per transaction",
            events,
            lambda: [publish("benchmark.noop", payload) for _ in range(events)],
        ),
        timed(
            "drain, one in-process worker",
            events,
            lambda: drain(Worker(worker_id="bench", batch_size=batch_size)),
        ),
    ]

    def publish_in_transactions() -> None:
        for start in range(0, events, 1000):
            with transaction.atomic():
                for _ in range(min(1000, events - start)):
                    publish("benchmark.noop", payload)

    results.append(
        timed("publish, 1,000 per transaction", events, publish_in_transactions)
    )
    OutboxEvent.objects.all().delete()
    results.append(
        timed(
            "publish_many, 1,000 per call",
            events,
            lambda: [
                publish_many(
                    NewEvent("benchmark.noop", payload)
                    for _ in range(min(1000, events - start))
                )
                for start in range(0, events, 1000)
            ],
        )
    )
    return results


def drain(worker: "Worker") -> None:
    while worker.run_once().claimed:
        pass


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
    print(f"{'workload':<34} {'events':>8} {'seconds':>9} {'events/s':>10}")  # noqa: T201
    for result in results:
        print(  # noqa: T201
            f"{result.workload:<34} {result.events:>8} {result.seconds:>9.3f} "
            f"{result.rate:>10,.0f}"
        )


if __name__ == "__main__":
    main()
