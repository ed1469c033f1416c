"""Benchmark the outbox on PostgreSQL, beside a raw-SQL ceiling.

    .venv/bin/python benchmarks/run.py [--quick] [--json results.json]

Creates a database of its own on the server of BENCHMARK_DATABASE_URL
(default: postgres://postgres@127.0.0.1:5432/postgres), runs every workload
twice (once with --quick), prints a table and drops the database. Commits are
durable: the server's synchronous_commit is left as it is (on by default) and
checked. --only NAME runs chosen workloads and checks no target.
"""

import argparse
import json
import os
import platform
import secrets
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SERVER = "postgres://postgres@127.0.0.1:5432/postgres"
RUNS = 2


def main() -> None:
    options = parse_arguments()
    server = os.environ.get("BENCHMARK_DATABASE_URL", DEFAULT_SERVER)
    name = f"outbox_bench_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        report = run(with_database(server, name), options)
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    print_table(report)
    if options.json:
        Path(options.json).write_text(json.dumps(report, indent=2) + "\n")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes, to check the benchmark itself (figures mean little)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=32, help="(default: %(default)r)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    parser.add_argument(
        "--only",
        metavar="WORKLOAD",
        action="append",
        help="run only this workload (repeatable), and check no targets",
    )
    return parser.parse_args()


def run(database_url: str, options: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    os.environ["DATABASE_URL"] = database_url
    os.environ["DJANGO_SETTINGS_MODULE"] = "benchmarks.settings"
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    from benchmarks import peers, relays
    from benchmarks import workloads as w

    call_command("migrate", run_syncdb=True, verbosity=0)
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        synchronous_commit = cursor.fetchone()[0]
    quick = options.quick
    batch = options.batch_size
    drain_events = 2_000 if quick else 20_000
    io_events = 100 if quick else 2_000
    plan: list[tuple[str, Callable[[], Any]]] = [
        ("ceiling", lambda: w.ceiling(drain_events, batch, database_url)),
        ("publish", lambda: w.publish_rates(1_000 if quick else 5_000)),
        ("drain-1", lambda: w.drain(drain_events, batch, 1)),
        ("drain-1-metrics", lambda: w.drain(drain_events, batch, 1, metrics=True)),
        ("drain-1-traced", lambda: w.drain(drain_events, batch, 1, traced=True)),
        ("fanout", lambda: w.fanout(200 if quick else 2_000, batch)),
        (
            "relay-jetstream",
            lambda: relays.relay(400 if quick else 10_000, "jetstream"),
        ),
        (
            "relay-rabbitmq",
            lambda: relays.relay(400 if quick else 10_000, "rabbitmq"),
        ),
        ("drain-4", lambda: w.drain(drain_events, batch, 4)),
        ("latency", lambda: w.latency(50 if quick else 1_000, database_url)),
        (
            "latency-metrics",
            lambda: w.latency(50 if quick else 1_000, database_url, metrics=True),
        ),
        (
            "latency-raw",
            lambda: w.latency(50 if quick else 1_000, database_url, raw=True),
        ),
        ("io-1", lambda: w.io(io_events, 1)),
        ("io-16", lambda: w.io(io_events, 16)),
        ("io-64", lambda: w.io(io_events, 64)),
        ("io-16-async", lambda: w.io(io_events, 16, event_type="benchmark.io_async")),
        (
            "procrastinate-16",
            lambda: peers.procrastinate_io(database_url, io_events, 16),
        ),
        ("pgqueuer-16", lambda: peers.pgqueuer_io(database_url, io_events, 16)),
        (
            "tasks",
            lambda: w.tasks(200 if quick else 10_000, 20 if quick else 300),
        ),
        ("scale-0", lambda: w.claim_time(0, batch)),
        ("scale-1m", lambda: w.claim_time(10_000 if quick else 1_000_000, batch)),
        (
            "memory",
            lambda: w.memory(10_000 if quick else 100_000, 1_000 if quick else 10_000),
        ),
        (
            "memory-16",
            lambda: w.memory(
                10_000 if quick else 100_000, 1_000 if quick else 10_000, 16
            ),
        ),
        # --quick: 1,000, 2,000 and 5,000, enough to run every part.
        ("backlog-10k", lambda: w.backlog(1_000 if quick else 10_000)),
        ("backlog-100k", lambda: w.backlog(2_000 if quick else 100_000)),
        ("backlog-1m", lambda: w.backlog(5_000 if quick else 1_000_000)),
        ("backlog-1m-4", lambda: w.backlog(5_000 if quick else 1_000_000, 4)),
        (
            "backlog-1m-c16",
            lambda: w.backlog(5_000 if quick else 1_000_000, 1, 16),
        ),
    ]
    if options.only:
        plan = [(key, workload) for key, workload in plan if key in options.only]
    runs: dict[str, list[list[dict[str, Any]]]] = {}
    for key, workload in plan:
        # A backlog of a million takes minutes to publish and drain: once.
        for _ in range(1 if quick or key.startswith("backlog") else RUNS):
            result = workload()
            measurements = result if isinstance(result, list) else [result]
            runs.setdefault(key, []).append(
                [{**asdict(m), "rate": m.rate} for m in measurements]
            )
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "postgresql": _version(connection.cursor().connection.info.server_version),
            "synchronous_commit": synchronous_commit,
            "batch_size": batch,
            "quick": quick,
        },
        "runs": runs,
        "targets": [] if options.only else targets(runs),
    }


def best(runs: dict[str, Any], key: str, index: int = 0, *, by: str = "rate") -> Any:
    """Return the better of the runs' measurement (highest rate by default)."""
    candidates = [run[index] for run in runs[key]]
    if by == "rate":
        return max(candidates, key=lambda m: m["rate"])
    return min(candidates, key=lambda m: m["notes"][by])


def targets(runs: dict[str, Any]) -> list[dict[str, Any]]:
    """Check the issue's targets with the better run of each workload."""
    ceiling = best(runs, "ceiling")["rate"]
    drain_1 = best(runs, "drain-1")["rate"]
    drain_4 = best(runs, "drain-4")["rate"]
    p50 = best(runs, "latency", by="p50_ms")["notes"]["p50_ms"]
    p99 = best(runs, "latency", by="p99_ms")["notes"]["p99_ms"]
    publish_one = min(run[0]["notes"]["time_vs_bare"] for run in runs["publish"])
    publish_tx = min(run[1]["notes"]["time_vs_bare"] for run in runs["publish"])
    publish_many = max(run[2]["notes"]["share_of_raw"] for run in runs["publish"])
    scale_0 = best(runs, "scale-0", by="median_ms")["notes"]["median_ms"]
    scale_1m = best(runs, "scale-1m", by="median_ms")["notes"]["median_ms"]
    memory = best(runs, "memory", by="growth_mb")["notes"]["growth_mb"]
    memory_16 = best(runs, "memory-16", by="growth_mb")["notes"]["growth_mb"]
    raw_p50 = best(runs, "latency-raw", by="p50_ms")["notes"]["p50_ms"]
    io_1, io_16, io_64 = (best(runs, f"io-{n}") for n in (1, 16, 64))
    procrastinate_16, pgqueuer_16 = (
        best(runs, "procrastinate-16"),
        best(runs, "pgqueuer-16"),
    )
    rss_64_vs_1 = io_64["notes"]["peak_rss_mb"] / io_1["notes"]["peak_rss_mb"]
    # tasks: ours at 0-4, django-tasks-db's at 5-9 (see workloads.tasks).
    task_runs = runs["tasks"]
    tasks_drain = max(run[i]["rate"] for run in task_runs for i in (1, 3))
    peer_drain = max(run[i]["rate"] for run in task_runs for i in (6, 8))
    tasks_p50 = min(run[4]["notes"]["p50_ms"] for run in task_runs)
    peer_p50 = min(run[9]["notes"]["p50_ms"] for run in task_runs)
    tasks_enqueue = max(run[0]["rate"] for run in task_runs)
    peer_enqueue = max(run[5]["rate"] for run in task_runs)
    backlog_10k = best(runs, "backlog-10k")["notes"]["steady_per_s"]
    backlog_1m = best(runs, "backlog-1m")
    claim_start = backlog_1m["notes"]["claim_ms_at_start"]
    claim_end = backlog_1m["notes"]["claim_ms_at_90"]
    drain_1_metrics = best(runs, "drain-1-metrics")["rate"]
    fanout_publish = min(
        run[1]["notes"]["time_vs_1_subscriber"] for run in runs["fanout"]
    )
    fanout_rows = max(run[2]["rate"] for run in runs["fanout"])
    relay_shares = {
        broker: max(run[2]["notes"]["share_of_bare"] for run in runs[f"relay-{broker}"])
        for broker in ("jetstream", "rabbitmq")
    }
    p50_metrics = best(runs, "latency-metrics", by="p50_ms")["notes"]["p50_ms"]
    return [
        check(
            "relay to JetStream, concurrency 16 >= 50 % of its client",
            relay_shares["jetstream"],
            ">=",
            0.5,
        ),
        check(
            "relay to RabbitMQ, concurrency 16 >= 50 % of its client",
            relay_shares["rabbitmq"],
            ">=",
            0.5,
        ),
        check(
            "publish(), 2 subscribers, <= 1.3 x the time of 1",
            fanout_publish,
            "<=",
            1.3,
        ),
        check(
            "drain of 2 subscribers' rows >= 90 % of drain-1",
            fanout_rows / drain_1,
            ">=",
            0.9,
        ),
        check(
            "drain with metrics on >= 97 % of off",
            drain_1_metrics / drain_1,
            ">=",
            0.97,
        ),
        check(
            "latency p50 with metrics on <= 1.03 x off", p50_metrics / p50, "<=", 1.03
        ),
        check(
            "tasks drain >= 10 x django-tasks-db",
            tasks_drain / peer_drain,
            ">=",
            10.0,
        ),
        check(
            "tasks latency p50 <= 1/50 of django-tasks-db",
            tasks_p50 / peer_p50,
            "<=",
            1 / 50,
        ),
        check(
            "tasks enqueue 1/tx >= 0.8 x django-tasks-db",
            tasks_enqueue / peer_enqueue,
            ">=",
            0.8,
        ),
        check(
            "backlog 1 M whole drain >= 80 % of 10 k steady",
            backlog_1m["rate"] / backlog_10k,
            ">=",
            0.8,
        ),
        check(
            "backlog 1 M claim at start <= 2 x at 90 %",
            claim_start / claim_end,
            "<=",
            2.0,
        ),
        check("io, concurrency 16 >= 90 % of 800/s", io_16["rate"] / 800, ">=", 0.9),
        check(
            "io, concurrency 16 above both peers at 16",
            io_16["rate"] / max(procrastinate_16["rate"], pgqueuer_16["rate"]),
            ">",
            1.0,
        ),
        check(
            "io, concurrency 64 >= 75 % of 3,200/s", io_64["rate"] / 3200, ">=", 0.75
        ),
        check("io peak RSS, concurrency 64 <= 1.5 x 1", rss_64_vs_1, "<=", 1.5),
        check("latency p50 <= 1.3 x a raw psycopg worker", p50 / raw_p50, "<=", 1.3),
        check("drain-1 >= 60 % of the ceiling", drain_1 / ceiling, ">=", 0.6),
        check("drain-4 >= 1.5 x drain-1", drain_4 / drain_1, ">=", 1.5),
        check("latency p50 <= 2 ms", p50, "<=", 2.0),
        check("latency p99 <= 5 ms", p99, "<=", 5.0),
        # publish() >= 0.8 x the rate of a bare ORM insert: <= 1.25 x its time.
        check("publish(), 1 per tx, <= 1.25 x bare insert", publish_one, "<=", 1.25),
        check("publish(), 1,000 per tx, <= 1.5 x bare insert", publish_tx, "<=", 1.5),
        check(
            "publish_many() >= 50 % of a raw multi-row INSERT",
            publish_many,
            ">=",
            0.5,
        ),
        check("claim with 1 M completed <= 1.2 x empty", scale_1m / scale_0, "<=", 1.2),
        check("RSS growth 10 k -> 100 k <= 10 MB", memory, "<=", 10.0),
        check("RSS growth at concurrency 16 <= 10 MB", memory_16, "<=", 10.0),
    ]


def check(name: str, value: float, operator: str, limit: float) -> dict[str, Any]:
    met = {
        ">=": value >= limit,
        ">": value > limit,
        "<=": value <= limit,
    }[operator]
    return {"target": name, "value": round(value, 3), "met": met}


def print_table(report: dict[str, Any]) -> None:
    machine = report["machine"]
    print(  # noqa: T201 - the command's output
        f"{machine['cpus']} CPUs, Python {machine['python']}, PostgreSQL "
        f"{machine['postgresql']}, synchronous_commit={machine['synchronous_commit']}"
    )
    header = f"{'workload':<46} {'run':>3} {'events':>8} {'seconds':>8} {'per s':>9}"
    print(f"{header}  notes")  # noqa: T201
    for runs in report["runs"].values():
        for number, measurements in enumerate(runs, start=1):
            for m in measurements:
                notes = "  ".join(
                    f"{key}={value:,.2f}" for key, value in m["notes"].items()
                )
                print(  # noqa: T201
                    f"{m['workload']:<46} {number:>3} {m['events']:>8} "
                    f"{m['seconds']:>8.3f} {m['rate']:>9,.0f}  {notes}"
                )
    print()  # noqa: T201
    for target in report["targets"]:
        verdict = "met" if target["met"] else "MISSED"
        print(f"{target['target']:<46} {target['value']:>10,.3f}  {verdict}")  # noqa: T201


def _version(number: int) -> str:
    """Return PostgreSQL's 150020 as 15.20."""
    return f"{number // 10000}.{number % 10000}"


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


if __name__ == "__main__":
    main()
