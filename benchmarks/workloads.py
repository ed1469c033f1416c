"""The benchmark's workloads. Each returns Measurements; run.py prints them.

Every workload uses what users run: publish(), publish_many() and real
`manage.py run_outbox_worker` processes. The ceiling alone is raw psycopg:
the least a safe outbox worker must do per batch, on the same table.
"""

import json
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
from django.db import connection, transaction

from benchmarks.models import BareRow, HandlerStart
from outbox import NewEvent, publish, publish_many
from outbox.models import OutboxEvent, Status
from outbox.statements import in_index_order

ROOT = Path(__file__).resolve().parent.parent
PAYLOAD = {"invitation_id": 12345, "organization_id": 678, "role": "member"}


@dataclass
class Measurement:
    workload: str
    events: int
    seconds: float
    notes: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


# --- helpers ----------------------------------------------------------------


def reset() -> None:
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE outbox_outboxevent, benchmarks_handlerstart")
        cursor.execute("TRUNCATE benchmarks_barerow")


def fill(
    events: int, event_type: str = "benchmark.noop", *, traced: bool = False
) -> None:
    """Publish the events; traced: inside a span, so each stores its context."""
    with _publishing_span() if traced else nullcontext():
        for start in range(0, events, 1000):
            count = min(1000, events - start)
            publish_many(NewEvent(event_type, PAYLOAD) for _ in range(count))
    vacuum()


def _publishing_span() -> Any:
    """A valid current span, as a traced request's, without an SDK here."""
    from opentelemetry import trace

    caller = trace.SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=True,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
    )
    return trace.use_span(trace.NonRecordingSpan(caller))


def vacuum() -> None:
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE outbox_outboxevent")


def not_completed() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM outbox_outboxevent WHERE status <> 'completed'"
        )
        return int(cursor.fetchone()[0])


def start_worker(
    *arguments: str, environment: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # noqa: S603 - our own interpreter and script
        [sys.executable, "manage.py", "run_outbox_worker", "-v", "0", *arguments],
        cwd=ROOT,
        env={
            **os.environ,
            **(environment or {}),
            "DJANGO_SETTINGS_MODULE": "benchmarks.settings",
        },
    )


def timed(name: str, events: int, function: Any) -> Measurement:
    started = time.perf_counter()
    function()
    return Measurement(name, events, time.perf_counter() - started)


# --- ceiling ------------------------------------------------------------------

CEILING_CLAIM = """
UPDATE outbox_outboxevent SET status = 'processing', attempts = attempts + 1,
       locked_by = 'ceiling', locked_until = now() + interval '60 seconds'
 WHERE id IN (SELECT id FROM outbox_outboxevent
               WHERE status = 'pending' AND NOT waiting AND available_at <= now()
               ORDER BY available_at, id LIMIT %s FOR UPDATE SKIP LOCKED)
RETURNING id, uuid, event_type, payload, key, attempts
"""
CEILING_COMPLETE = """
UPDATE outbox_outboxevent SET status = 'completed', completed_at = now(),
       locked_until = NULL
 WHERE id = ANY(%s) AND locked_by = 'ceiling' AND status = 'processing'
"""


def ceiling(events: int, batch_size: int, database_url: str) -> Measurement:
    """Claim with one UPDATE ... SKIP LOCKED ... RETURNING, complete with one more.

    Each statement is its own durable transaction (autocommit), as a raw
    worker with no handler would do it: the denominator of the ratios.
    """
    reset()
    fill(events)
    with psycopg.connect(database_url, autocommit=True) as raw:
        started = time.perf_counter()
        while True:
            rows = raw.execute(CEILING_CLAIM, [batch_size]).fetchall()
            if not rows:
                break
            raw.execute(CEILING_COMPLETE, [[row[0] for row in rows]])
        seconds = time.perf_counter() - started
    return Measurement(f"ceiling, raw SQL, batch {batch_size}", events, seconds)


# --- publish ------------------------------------------------------------------


def publish_rates(events: int) -> list[Measurement]:
    """publish() and publish_many() next to bare ORM inserts of the same rows."""
    reset()
    results = []
    for name, ours, bare in [
        (
            "publish, 1 per transaction",
            partial(_one_per_transaction, events, _publish_one),
            partial(_one_per_transaction, events, _insert_one),
        ),
        (
            "publish, 1,000 per transaction",
            partial(_thousand_per_transaction, events, _publish_one),
            partial(_thousand_per_transaction, events, _insert_one),
        ),
        (
            "publish_many, 1,000 per call",
            partial(_in_thousands, events, _publish_many),
            partial(_in_thousands, events, _bulk_create),
        ),
    ]:
        measured = timed(name, events, ours)
        baseline = timed(name, events, bare)
        measured.notes = {
            "bare_insert_per_s": baseline.rate,
            "time_vs_bare": measured.seconds / baseline.seconds,
        }
        results.append(measured)
        reset()
    # publish_many() beside the fastest way to write the same rows: one
    # multi-row INSERT per thousand in plain SQL, values bound by psycopg.
    raw = timed("raw", events, partial(_in_thousands, events, _raw_insert))
    many = results[-1]
    many.notes["raw_insert_per_s"] = raw.rate
    many.notes["share_of_raw"] = many.rate / raw.rate
    reset()
    return results


def _one_per_transaction(events: int, insert: Any) -> None:
    for _ in range(events):
        insert()


def _thousand_per_transaction(events: int, insert: Any) -> None:
    for start in range(0, events, 1000):
        with transaction.atomic():
            for _ in range(min(1000, events - start)):
                insert()


def _in_thousands(events: int, insert_many: Any) -> None:
    for start in range(0, events, 1000):
        insert_many(min(1000, events - start))


def _publish_one() -> None:
    publish("benchmark.noop", PAYLOAD)


def _publish_to_two() -> None:
    publish("benchmark.fanout", PAYLOAD)


def fanout(events: int, batch_size: int) -> list[Measurement]:
    """What fan-out costs: publish() of an event with two subscribers (two
    rows, one INSERT) beside one with one, one per transaction, and a worker
    draining the two subscribers' rows beside drain-1's rows."""
    reset()
    one = timed(
        "publish, 1 per transaction, 1 subscriber",
        events,
        partial(_one_per_transaction, events, _publish_one),
    )
    reset()
    two = timed(
        "publish, 1 per transaction, 2 subscribers",
        events,
        partial(_one_per_transaction, events, _publish_to_two),
    )
    two.notes = {"time_vs_1_subscriber": two.seconds / one.seconds}
    rows = drain(events * 4, batch_size, 1, subscribers=2)
    return [one, two, rows]


def _insert_one() -> None:
    BareRow.objects.create(event_type="benchmark.noop", payload=PAYLOAD)


def _publish_many(count: int) -> None:
    publish_many(NewEvent("benchmark.noop", PAYLOAD) for _ in range(count))


def _raw_insert(count: int) -> None:
    table = BareRow._meta.db_table
    row = "(%s, %s::jsonb, %s, statement_timestamp())"
    encoded = json.dumps(PAYLOAD)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (event_type, payload, max_attempts, created_at) "  # noqa: S608 - names
            f"VALUES {', '.join([row] * count)}",
            [value for _ in range(count) for value in ("benchmark.noop", encoded, 10)],
        )


def _bulk_create(count: int) -> None:
    BareRow.objects.bulk_create(
        BareRow(event_type="benchmark.noop", payload=PAYLOAD) for _ in range(count)
    )


# --- drain ------------------------------------------------------------------


def drain(
    events: int,
    batch_size: int,
    processes: int,
    *,
    metrics: bool = False,
    traced: bool = False,
    subscribers: int = 1,
) -> Measurement:
    """Drain no-op events with worker processes; the rate from 10 % to 90 %.

    The rate is of rows: with subscribers=2, events / 2 events of two
    subscribers each (benchmark.fanout).

    metrics: each worker serves Prometheus metrics (--metrics-port).
    traced: the events are published inside a span, and each worker has an
    OpenTelemetry SDK provider (benchmarks/tracing.py); otherwise the workers
    have the API alone, as a project that never set a provider.
    """
    reset()
    if subscribers == 2:
        fill(events // 2, "benchmark.fanout")
    else:
        fill(events, traced=traced)
    workers = [
        start_worker(
            "--drain",
            "--batch-size",
            str(batch_size),
            *_metrics(metrics),
            environment={"BENCHMARK_TRACING": "1"} if traced else None,
        )
        for _ in range(processes)
    ]
    started = time.perf_counter()
    marks: dict[float, float] = {}
    while len(marks) < 2:
        done = 1 - not_completed() / events
        for mark in (0.1, 0.9):
            if done >= mark and mark not in marks:
                marks[mark] = time.perf_counter()
        time.sleep(0.002)
    for worker in workers:
        if worker.wait(timeout=300):
            raise RuntimeError("a benchmark worker failed")
    plural = "es" if processes > 1 else ""
    metered = ", metrics on" if metrics else ", traced" if traced else ""
    if subscribers == 2:
        metered = ", rows of 2 subscribers"
    return Measurement(
        f"drain, {processes} worker process{plural}, batch {batch_size}{metered}",
        int(events * 0.8),
        marks[0.9] - marks[0.1],
        {"seconds_with_startup": time.perf_counter() - started},
    )


# --- io ---------------------------------------------------------------------


def io(
    events: int, concurrency: int, *, event_type: str = "benchmark.io"
) -> Measurement:
    """Drain handlers that wait 20 ms with one worker process at a concurrency.

    The rate from 10 % to 90 %, its share of the limit (concurrency handlers
    at once, 20 ms each), the worker's peak RSS and the most database
    connections it held at once.
    """
    reset()
    fill(events, event_type)
    before = backends()
    worker = start_worker("--drain", "--concurrency", str(concurrency))
    marks: dict[float, float] = {}
    peak_rss, connections = 0.0, 0
    while len(marks) < 2:
        done = 1 - not_completed() / events
        for mark in (0.1, 0.9):
            if done >= mark and mark not in marks:
                marks[mark] = time.perf_counter()
        peak_rss = max(peak_rss, _peak_rss_mb(worker.pid) or 0.0)
        connections = max(connections, backends() - before)
        time.sleep(0.005)
    if worker.wait(timeout=300):
        raise RuntimeError("a benchmark worker failed")
    seconds = marks[0.9] - marks[0.1]
    rate = events * 0.8 / seconds
    kind = ", async def" if event_type.endswith("async") else ""
    return Measurement(
        f"io 20 ms, 1 process, concurrency {concurrency}{kind}",
        int(events * 0.8),
        seconds,
        {
            "share_of_limit": rate / (concurrency / 0.020),
            "peak_rss_mb": peak_rss,
            "connections": connections,
        },
    )


def backends() -> int:
    """Return the sessions on this database, other than this one."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return int(cursor.fetchone()[0])


# --- latency ------------------------------------------------------------------


def _metrics(on: bool) -> list[str]:
    """The worker's options that turn its metrics on, on a free port."""
    if not on:
        return []
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return ["--metrics-port", str(probe.getsockname()[1])]


def latency(
    events: int, database_url: str, *, raw: bool = False, metrics: bool = False
) -> Measurement:
    """Commit to handler start, events 10 ms apart, one idle worker.

    raw: the same with benchmarks/raw_worker.py, the floor a worker that
    claims in one short transaction and then starts the handler can reach.
    """
    reset()
    if raw:
        worker = subprocess.Popen(  # noqa: S603 - our own interpreter and script
            [sys.executable, str(ROOT / "benchmarks" / "raw_worker.py"), database_url],
            stdout=subprocess.PIPE,
        )
        assert worker.stdout is not None  # noqa: S101 - piped above
        worker.stdout.readline()  # "raw worker listening"
    else:
        worker = start_worker(*_metrics(metrics))
    time.sleep(2)  # started and idle, waiting with the default poll interval
    committed: dict[str, float] = {}
    started = time.perf_counter()
    try:
        for _ in range(events):
            stamp: list[float] = []
            with transaction.atomic():
                # Registered before publish()'s wake-up, so it runs first,
                # right after COMMIT returns.
                transaction.on_commit(partial(_stamp, stamp))
                event = publish("benchmark.clock", {})
            committed[str(event.uuid)] = stamp[0]
            time.sleep(0.01)
        deadline = time.monotonic() + 30
        while HandlerStart.objects.count() < events and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    kind = ", raw psycopg worker" if raw else ", metrics on" if metrics else ""
    return _latencies("latency, commit to handler start" + kind, committed, started)


def _latencies(name: str, committed: dict[str, float], started: float) -> Measurement:
    """Commit to start per event, from HandlerStart rows, as percentiles."""
    latencies = sorted(
        (row.started_at - committed[str(row.event_uuid)]) * 1000
        for row in HandlerStart.objects.all()
    )
    cuts = statistics.quantiles(latencies, n=100)
    return Measurement(
        name,
        len(latencies),
        time.perf_counter() - started,
        {
            "p50_ms": cuts[49],
            "p95_ms": cuts[94],
            "p99_ms": cuts[98],
            "max_ms": latencies[-1],
        },
    )


def _stamp(stamps: list[float]) -> None:
    stamps.append(time.time())


# --- scale ------------------------------------------------------------------


def claim_time(completed_rows: int, batch_size: int) -> Measurement:
    """Median time of the worker's claim query beside completed_rows old events."""
    from outbox.worker import Worker

    reset()
    if completed_rows:
        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO outbox_outboxevent (uuid, event_type, payload, key,"
                " status, waiting, attempts, max_attempts, available_at,"
                " locked_by, created_at, completed_at, last_error, history,"
                " discarded_by)"
                " SELECT gen_random_uuid(), 'benchmark.noop', '{}', '', 'completed',"
                " false, 1, 10, now(), 'old', now(), now(), '', '[]', ''"
                " FROM generate_series(1, %s)",
                [completed_rows],
            )
    fill(5000)
    worker = Worker(worker_id="scale", batch_size=batch_size)
    timings = []
    for _ in range(100):
        with transaction.atomic():
            started = time.perf_counter()
            list(
                OutboxEvent.objects.ready()
                .defer("history")
                .select_for_update(skip_locked=True)[: worker.batch_size]
            )
            timings.append(time.perf_counter() - started)
            transaction.set_rollback(True)
    median = statistics.median(timings)
    return Measurement(
        f"claim query, {completed_rows:,} completed rows",
        batch_size,
        median,
        {"median_ms": median * 1000},
    )


# --- backlog ----------------------------------------------------------------


def backlog(events: int, processes: int = 1, concurrency: int = 1) -> Measurement:
    """Drain a backlog published into a fresh table no one has analyzed.

    The outbox's tables are dropped and migrated again, autovacuum is off for
    the event table (so no analyze happens by luck during the run), and the
    events go in with publish_many(), with no VACUUM ANALYZE after (the
    notes count the table's vacuums and analyzes, to show none ran). Then
    worker processes drain it. The whole-drain rate runs from the workers'
    start; the steady rate from 10 % to 90 % done; the claim's median is the
    worker's own claim statement, taken in a rolled-back transaction before
    the workers start and again once 90 % is done.
    """
    from django.core.management import call_command

    call_command("migrate", "outbox", "zero", verbosity=0)
    call_command("migrate", "outbox", verbosity=0)
    with connection.cursor() as cursor:
        cursor.execute(
            "ALTER TABLE outbox_outboxevent SET (autovacuum_enabled = false)"
        )
    for start in range(0, events, 1000):
        count = min(1000, events - start)
        publish_many(NewEvent("benchmark.noop", PAYLOAD) for _ in range(count))
    first = OutboxEvent.objects.order_by("id").values_list("id", flat=True)[0]
    claim_at_start = _claim_median()
    arguments = ["--drain", "--concurrency", str(concurrency)]
    started = time.perf_counter()
    workers = [start_worker(*arguments) for _ in range(processes)]
    try:
        marks, claim_at_end = _watch_backlog(workers, first, events)
        for worker in workers:
            if worker.wait(timeout=3600):
                raise RuntimeError("a benchmark worker failed")
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
        with connection.cursor() as cursor:
            cursor.execute("ALTER TABLE outbox_outboxevent RESET (autovacuum_enabled)")
    whole = time.perf_counter() - started
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT autovacuum_count, autoanalyze_count + analyze_count "
            "FROM pg_stat_user_tables WHERE relname = 'outbox_outboxevent'"
        )
        vacuums, analyzes = cursor.fetchone()
    shape = f"{processes} process{'es' if processes > 1 else ''}"
    if concurrency > 1:
        shape += f", concurrency {concurrency}"
    return Measurement(
        f"backlog of {events:,}, never analyzed, {shape}",
        events,
        whole,
        {
            "steady_per_s": events * 0.8 / (marks[0.9] - marks[0.1]),
            "claim_ms_at_start": claim_at_start * 1000,
            "claim_ms_at_90": claim_at_end * 1000,
            "vacuums": vacuums,
            "analyzes": analyzes,
        },
    )


def _watch_backlog(
    workers: list[subprocess.Popen[bytes]], first: int, events: int
) -> tuple[dict[float, float], float]:
    """When 10 % and 90 % were claimed, and the claim's median at 90 %.

    Progress is where the head of the ready index has got to: a count of
    the events not completed, planned on a table never analyzed, read the
    whole table every poll, and on two cores took a core from the workers.
    """
    marks: dict[float, float] = {}
    claim_at_90 = 0.0
    while len(marks) < 2:
        if any(worker.poll() for worker in workers):
            raise RuntimeError("a benchmark worker failed")
        done = _claimed_share(first, events)
        for mark in (0.1, 0.9):
            if done >= mark and mark not in marks:
                marks[mark] = time.perf_counter()
                if mark == 0.9:
                    claim_at_90 = _claim_median()
        time.sleep(0.05)
    return marks, claim_at_90


def _claimed_share(first: int, events: int) -> float:
    """The share of the backlog, published in id order, claimed so far."""
    with in_index_order(connection.alias):
        head = (
            OutboxEvent.objects.filter(status=Status.PENDING, waiting=False)
            .order_by("available_at", "id")
            .values_list("id", flat=True)
            .first()
        )
    return 1.0 if head is None else (head - first) / events


def _claim_median(samples: int = 9) -> float:
    """The median time of the worker's claim of 32, rolled back each time."""
    from datetime import timedelta

    timings = []
    for _ in range(samples):
        with transaction.atomic():
            started = time.perf_counter()
            OutboxEvent.objects.claim(
                worker_id="probe", limit=32, lease=timedelta(seconds=60)
            )
            timings.append(time.perf_counter() - started)
            transaction.set_rollback(True)
    return statistics.median(timings)


# --- memory -----------------------------------------------------------------


def memory(events: int, early: int, concurrency: int = 1) -> Measurement:
    """Peak RSS of one worker after `early` events and after all of them."""
    reset()
    fill(events)
    worker = start_worker("--drain", "--concurrency", str(concurrency))
    peaks: dict[str, float] = {}
    started = time.perf_counter()
    while worker.poll() is None:
        done = events - not_completed()
        peak = _peak_rss_mb(worker.pid)
        if peak is not None:
            if done >= early and "early" not in peaks:
                peaks["early"] = peak
            peaks["last"] = peak
        time.sleep(0.02)
    return Measurement(
        f"memory, worker peak RSS, {early:,} then {events:,} events, "
        f"concurrency {concurrency}",
        events,
        time.perf_counter() - started,
        {
            f"rss_mb_after_{early}": peaks.get("early", 0.0),
            f"rss_mb_after_{events}": peaks.get("last", 0.0),
            "growth_mb": peaks.get("last", 0.0) - peaks.get("early", 0.0),
        },
    )


def _peak_rss_mb(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


# --- tasks: django.tasks on the outbox beside django-tasks-db ------------------

PEER_TABLE = "django_tasks_database_dbtaskresult"


def tasks(count: int, latency_count: int) -> list[Measurement]:
    """Enqueue and drain no-op tasks, and commit-to-start latency, per backend.

    Ours: OutboxTaskBackend and one run_outbox_worker (concurrency 1,
    batch 32). The peer: django-tasks-db's DatabaseBackend and one
    `manage.py db_worker --backend db`, with its defaults (it polls every
    second). Enqueue one per transaction (autocommit: each its own) and
    1,000 per transaction; each backlog is then drained, the rate from 10 %
    to 90 %.
    """
    from benchmarks import tasks as t

    results = []
    for name, task, worker, unfinished in [
        ("outbox", t.noop, start_worker, not_completed),
        ("django-tasks-db", t.db_noop, _peer_task_worker, _peer_unfinished),
    ]:
        for per_transaction in (1, 1000):
            _reset_tasks()
            enqueued = timed(
                f"tasks, {name}, enqueue {per_transaction:,} per transaction",
                count,
                partial(_enqueue, task, count, per_transaction),
            )
            drained = _drain_tasks(worker, unfinished, count)
            drained.workload = f"tasks, {name}, drain, 1 worker"
            drained.notes["enqueued_per_transaction"] = per_transaction
            results += [enqueued, drained]
        results.append(
            _task_latency(
                name,
                t.clock if name == "outbox" else t.db_clock,
                worker,
                latency_count,
            )
        )
    _reset_tasks()
    return results


def _reset_tasks() -> None:
    reset()
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {PEER_TABLE}")
        cursor.execute(f"VACUUM ANALYZE {PEER_TABLE}")
    vacuum()


def _enqueue(task: Any, count: int, per_transaction: int) -> None:
    if per_transaction == 1:
        for _ in range(count):
            task.enqueue()
        return
    for start in range(0, count, per_transaction):
        with transaction.atomic():
            for _ in range(min(per_transaction, count - start)):
                task.enqueue()


def _peer_task_worker(*arguments: str) -> subprocess.Popen[bytes]:
    drain = ["--batch"] if "--drain" in arguments else []
    return subprocess.Popen(  # noqa: S603 - our own interpreter and script
        [
            sys.executable,
            "manage.py",
            "db_worker",
            "--backend",
            "db",
            "--no-startup-delay",
            "-v",
            "0",
            *drain,
        ],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "benchmarks.settings"},
    )


def _peer_unfinished() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT count(*) FROM {PEER_TABLE} "  # noqa: S608 - a constant
            "WHERE status IN ('READY', 'RUNNING')"
        )
        return int(cursor.fetchone()[0])


def _drain_tasks(worker: Any, unfinished: Any, count: int) -> Measurement:
    process = worker("--drain")
    marks: dict[float, float] = {}
    while len(marks) < 2:
        done = 1 - unfinished() / count
        for mark in (0.1, 0.9):
            if done >= mark and mark not in marks:
                marks[mark] = time.perf_counter()
        if process.poll() is not None and len(marks) < 2:
            raise RuntimeError("a task worker exited before draining its tasks")
        time.sleep(0.005)
    if process.wait(timeout=600):
        raise RuntimeError("a task worker failed")
    return Measurement("tasks drain", int(count * 0.8), marks[0.9] - marks[0.1])


def _task_latency(name: str, task: Any, worker: Any, count: int) -> Measurement:
    """Commit to task start, one task per transaction 10 ms apart, idle worker."""
    _reset_tasks()
    process = worker()
    time.sleep(3)  # started and idle
    committed: dict[str, float] = {}
    started = time.perf_counter()
    try:
        for _ in range(count):
            stamp: list[float] = []
            with transaction.atomic():
                transaction.on_commit(partial(_stamp, stamp))
                result = task.enqueue()
            committed[str(uuid.UUID(result.id))] = stamp[0]
            time.sleep(0.01)
        deadline = time.monotonic() + 60
        while HandlerStart.objects.count() < count and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        process.terminate()
        process.wait(timeout=30)
    return _latencies(f"tasks, {name}, latency, commit to start", committed, started)
