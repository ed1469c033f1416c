"""Two peer job queues on the outbox's "io" workload, to print beside ours.

    procrastinate_io(database_url, jobs, concurrency) -> Measurement
    pgqueuer_io(database_url, jobs, concurrency) -> Measurement

Each drains `jobs` jobs whose handler waits 20 ms with ONE real worker
process of the peer, as workloads.io does with `run_outbox_worker --drain`:

- Handler: an `async def` awaiting asyncio.sleep(0.020) by default, since
  both peers' workers are asyncio-native (pgqueuer 1.x accepts coroutine
  entrypoints only). handler="sync" measures a blocking handler instead
  (workload name ", blocking handler"): a plain `def` calling
  time.sleep(0.020) for procrastinate, which runs it in its event loop's
  default thread pool, and `await asyncio.to_thread(time.sleep, 0.020)` for
  pgqueuer, its documented way; either way at most min(32, CPUs + 4) run at
  once. See benchmarks/peer_tasks.py.
- Schema: each peer's tables, types, functions and triggers go into a
  PostgreSQL schema of their own, peer_procrastinate or peer_pgqueuer, in the
  given database: created before the run and dropped (CASCADE) after, so
  nothing touches the Django tables in `public` and a second run starts
  clean. The peer reaches it through its connections' search_path, so its
  unqualified SQL lands there. It is installed with the peer's own API:
  procrastinate's schema_manager.apply_schema(), pgqueuer's Queries.install().
- Jobs: enqueued with one bulk call (procrastinate's batch_defer, pgqueuer's
  enqueue of lists), then the job table is VACUUM ANALYZEd as workloads.fill
  does; none of that is timed.
- Worker: one subprocess of this interpreter that exits once the queue is
  empty: `python -m procrastinate ... worker --concurrency N --one-shot`, or
  pgqueuer.run(..., mode=drain) on uvloop, which is what `pgq run` does (see
  peer_tasks.py for why not `pgq run` itself). Every other setting is the
  peer's default (procrastinate: its psycopg pool; pgqueuer: batch size 10,
  one connection). pgqueuer runs on asyncpg, the driver `pgq run` picks first
  and its examples use; driver="psycopg" runs its psycopg 3 driver instead,
  which in pgqueuer 1.6 holds the connection's lock for up to a second in
  each wait for a NOTIFY, so that queries on it stall (a few jobs per second).
- Rate: that of workloads.drain, the time between 10 % and 90 % of the jobs
  finished, polled every 5 ms from the peer's own tables: procrastinate's
  jobs not yet 'succeeded' in procrastinate_jobs; the rows left in pgqueuer's
  queue table (it deletes a job in the statement that logs it done). After
  the worker exits, every job must have succeeded.
- connections: the most sessions pg_stat_activity shows at once with the
  worker's application_name, which the worker sets on every connection it
  opens (PEER_APPLICATION_NAME; neither peer sets one of its own); sampled
  with each poll.
- peak_rss_mb: the worker's VmHWM from /proc, summed over its descendant
  processes too (neither peer forks here; a pool of processes would count).

Import it once Django is set up, as benchmarks.workloads, whose Measurement
it returns.
"""

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import pgqueuer
import procrastinate
import psycopg
from pgqueuer.db import SyncPsycopgDriver
from pgqueuer.queries import SyncQueries
from psycopg import sql

from benchmarks.peer_tasks import IO_SECONDS
from benchmarks.workloads import Measurement, _peak_rss_mb

ROOT = Path(__file__).resolve().parent.parent
POLL_SECONDS = 0.005
TIMEOUT_SECONDS = 300.0
Handler = Literal["async", "sync"]


@dataclass(frozen=True)
class Peer:
    """How to set up, run and watch one peer; {schema} in SQL is its schema."""

    name: str
    setup: Callable[[str], None]  # install the schema and enqueue, given a URL
    worker: list[str]  # the worker's command line after the interpreter
    job_table: str
    unfinished: str  # counts the jobs not finished yet
    succeeded: str  # counts the jobs that succeeded

    @property
    def schema(self) -> str:
        return f"peer_{self.name}"

    def query(self, template: str) -> sql.Composed:
        return sql.SQL(template).format(schema=sql.Identifier(self.schema))


def procrastinate_io(
    database_url: str, jobs: int, concurrency: int, *, handler: Handler = "async"
) -> Measurement:
    """Drain the jobs with `procrastinate worker --concurrency N --one-shot`."""
    task = "benchmark_io" if handler == "async" else "benchmark_io_sync"

    def setup(url: str) -> None:
        app = procrastinate.App(
            connector=procrastinate.SyncPsycopgConnector(conninfo=url)
        )
        with app.open():
            app.schema_manager.apply_schema()
            app.configure_task(task).batch_defer(*({} for _ in range(jobs)))

    peer = Peer(
        "procrastinate",
        setup,
        [
            "-m",
            "procrastinate",
            "--app=benchmarks.peer_tasks.procrastinate_app",
            "worker",
            "--concurrency",
            str(concurrency),
            "--one-shot",
        ],
        "procrastinate_jobs",
        "SELECT count(*) FROM {schema}.procrastinate_jobs"
        " WHERE status IN ('todo', 'doing')",
        "SELECT count(*) FROM {schema}.procrastinate_jobs WHERE status = 'succeeded'",
    )
    drained = measure(peer, database_url, jobs)
    return drained.measurement(
        f"procrastinate concurrency {concurrency}", concurrency, handler
    )


def pgqueuer_io(
    database_url: str,
    jobs: int,
    concurrency: int,
    *,
    handler: Handler = "async",
    driver: Literal["asyncpg", "psycopg"] = "asyncpg",
) -> Measurement:
    """Drain the jobs with pgqueuer's drain mode, concurrency_limit=N."""

    def setup(url: str) -> None:
        asyncio.run(_pgqueuer_install(url))
        with psycopg.connect(url, autocommit=True) as connection:
            SyncQueries(SyncPsycopgDriver(connection)).enqueue(
                ["benchmark_io"] * jobs, [None] * jobs, [0] * jobs
            )

    arguments = [str(concurrency), handler, driver]
    command = f"from benchmarks.peer_tasks import main; main({arguments!r})"
    peer = Peer(
        "pgqueuer",
        setup,
        ["-c", command],
        "pgqueuer",
        "SELECT count(*) FROM {schema}.pgqueuer",
        "SELECT count(*) FROM {schema}.pgqueuer_log WHERE status = 'successful'",
    )
    drained = measure(peer, database_url, jobs)
    name = f"pgqueuer concurrency {concurrency}"
    if driver != "asyncpg":
        name += f", {driver} driver"
    return drained.measurement(name, concurrency, handler)


async def _pgqueuer_install(url: str) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as c:
        await pgqueuer.Queries(pgqueuer.PsycopgDriver(c)).install()


# --- shared -----------------------------------------------------------------


@dataclass
class Drained:
    jobs: int
    seconds: float
    peak_rss_mb: float
    connections: int

    def measurement(
        self, name: str, concurrency: int, handler: Handler = "async"
    ) -> Measurement:
        rate = self.jobs * 0.8 / self.seconds
        return Measurement(
            f"io, {name}" + (", blocking handler" if handler == "sync" else ""),
            int(self.jobs * 0.8),
            self.seconds,
            {
                "share_of_limit": rate / (concurrency / IO_SECONDS),
                "peak_rss_mb": self.peak_rss_mb,
                "connections": self.connections,
            },
        )


def measure(peer: Peer, database_url: str, jobs: int) -> Drained:
    """Set the peer up in its own schema, drain its jobs, check, drop it all."""
    with own_schema(database_url, peer.schema) as url:
        peer.setup(url)
        with psycopg.connect(database_url, autocommit=True) as connection:
            connection.execute(
                sql.SQL("VACUUM ANALYZE {}.{}").format(
                    sql.Identifier(peer.schema), sql.Identifier(peer.job_table)
                )
            )
        drained = drain(peer, database_url, jobs)
        with psycopg.connect(database_url, autocommit=True) as connection:
            succeeded = count(connection, peer.query(peer.succeeded))
        if succeeded != jobs:
            raise RuntimeError(f"{peer.name}: {succeeded} of {jobs} jobs succeeded")
    return drained


@contextlib.contextmanager
def own_schema(database_url: str, schema: str) -> Iterator[str]:
    """Create `schema` afresh; yield a URL whose search_path is it; drop it."""
    name = sql.Identifier(schema)
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(name))
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(name))
    try:
        yield with_parameters(database_url, options=f"-c search_path={schema}")
    finally:
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(name))


def with_parameters(url: str, **parameters: str) -> str:
    """Return `url` with these libpq parameters added to its query string."""
    parts = urlsplit(url)
    query = [*parse_qsl(parts.query), *parameters.items()]
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote)))


def drain(peer: Peer, database_url: str, jobs: int) -> Drained:
    """Run the worker until it exits; time 10 % to 90 % of the jobs finished."""
    application_name = f"benchmark_{peer.name}_worker"
    env = {
        **os.environ,
        "PEER_DATABASE_URL": database_url,
        "PEER_SCHEMA": peer.schema,
        "PEER_APPLICATION_NAME": application_name,
    }
    with (
        psycopg.connect(database_url, autocommit=True) as monitor,
        tempfile.TemporaryFile() as output,
    ):
        worker = subprocess.Popen(  # noqa: S603 - our own interpreter, a peer's worker
            [sys.executable, *peer.worker],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        try:
            drained = watch(
                worker, monitor, peer.query(peer.unfinished), jobs, application_name
            )
            failed = worker.wait(timeout=TIMEOUT_SECONDS)
        except BaseException as error:
            worker.kill()
            worker.wait()
            if isinstance(error, RuntimeError):
                raise RuntimeError(f"{peer.name}: {error}:\n{tail(output)}") from error
            raise
        if failed:
            raise RuntimeError(f"the {peer.name} worker failed:\n{tail(output)}")
    return drained


def watch(
    worker: subprocess.Popen[bytes],
    monitor: psycopg.Connection,
    unfinished: sql.Composed,
    jobs: int,
    application_name: str,
) -> Drained:
    """Poll as workloads.io does, until 90 % of the jobs are finished."""
    marks: dict[float, float] = {}
    peak_rss, connections = 0.0, 0
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while len(marks) < 2:
        done = 1 - count(monitor, unfinished) / jobs
        for mark in (0.1, 0.9):
            if done >= mark and mark not in marks:
                marks[mark] = time.perf_counter()
        peak_rss = max(peak_rss, tree_peak_rss_mb(worker.pid))
        connections = max(connections, worker_backends(monitor, application_name))
        if len(marks) < 2 and worker.poll() is not None:
            raise RuntimeError(f"the worker exited at {done:.0%} of the jobs")
        if len(marks) < 2 and time.monotonic() > deadline:
            raise RuntimeError(f"{done:.0%} of the jobs done in {TIMEOUT_SECONDS} s")
        time.sleep(POLL_SECONDS)
    return Drained(jobs, marks[0.9] - marks[0.1], peak_rss, connections)


def worker_backends(monitor: psycopg.Connection, application_name: str) -> int:
    """Return the sessions on this database that the worker opened."""
    return count(
        monitor,
        sql.SQL(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = {}"
        ).format(sql.Literal(application_name)),
    )


def tree_peak_rss_mb(pid: int) -> float:
    """Sum VmHWM of the process and of all its descendants (0 once gone)."""
    return sum(_peak_rss_mb(each) or 0.0 for each in [pid, *descendants(pid)])


def descendants(pid: int) -> list[int]:
    found = []
    for thread in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in map(int, (thread / "children").read_text().split()):
                found += [child, *descendants(child)]
    return found


def count(connection: psycopg.Connection, query: sql.Composed) -> int:
    row = connection.execute(query).fetchone()
    assert row is not None  # noqa: S101 - count(*) returns one row
    return int(row[0])


def tail(output: IO[bytes]) -> str:
    """Return the end of the worker's output, for an error message."""
    output.seek(0)
    return output.read().decode(errors="replace")[-2000:]
