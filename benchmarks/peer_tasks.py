"""The peers' task definitions, imported by their worker processes.

benchmarks/peers.py starts the workers with three environment variables:
PEER_DATABASE_URL (the benchmark's database), PEER_SCHEMA (the PostgreSQL
schema holding the peer's tables, put first on the search_path of every
connection) and PEER_APPLICATION_NAME (set on every connection, so that
pg_stat_activity tells the worker's sessions apart). Every handler waits
20 ms, as benchmarks.handlers.wait_on_io does for the outbox, touching no
table. The workers:

    python -m procrastinate --app=benchmarks.peer_tasks.procrastinate_app \\
        worker --concurrency N --one-shot
    python -c 'from benchmarks.peer_tasks import main; main(["N", "async", "asyncpg"])'

The second runs what `pgq run benchmarks.peer_tasks:pgqueuer_worker --mode
drain -- N async asyncpg` runs (pgqueuer.run() on uvloop), without the CLI:
pgqueuer 1.6's `pgq run` fails at start with typer >= 0.29 ("'str' object has
no attribute 'name'" while it sets up its logger), whatever the options.
"""

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import AsyncIterator

import asyncpg  # type: ignore[import-untyped]
import pgqueuer
import procrastinate
import psycopg
import uvloop
from pgqueuer.db import AsyncpgDriver, Driver, PsycopgDriver
from pgqueuer.models import Job
from pgqueuer.types import QueueExecutionMode
from psycopg.conninfo import make_conninfo

IO_SECONDS = 0.020


def libpq_settings() -> dict[str, str]:
    """Connection parameters for the worker's sessions, from the environment."""
    settings = {}
    if schema := os.environ.get("PEER_SCHEMA"):
        settings["options"] = f"-c search_path={schema}"
    if name := os.environ.get("PEER_APPLICATION_NAME"):
        settings["application_name"] = name
    return settings


# --- procrastinate ----------------------------------------------------------
# The worker's concurrency is its CLI's --concurrency. procrastinate's worker
# is asyncio: an `async def` task runs on its event loop (the idiomatic way
# for I/O), a plain `def` task in the loop's default thread pool. Its
# connector is a psycopg (3) AsyncConnectionPool of the default size.

procrastinate_app = procrastinate.App(
    connector=procrastinate.PsycopgConnector(
        conninfo=os.environ.get("PEER_DATABASE_URL", ""),
        kwargs=libpq_settings(),
    )
)


@procrastinate_app.task(name="benchmark_io")
async def procrastinate_io() -> None:
    """Wait 20 ms on the worker's event loop."""
    await asyncio.sleep(IO_SECONDS)


@procrastinate_app.task(name="benchmark_io_sync")
def procrastinate_io_sync() -> None:
    """Wait 20 ms in a thread, as blocking client code would."""
    time.sleep(IO_SECONDS)


# --- pgqueuer ---------------------------------------------------------------
# Entrypoints must be `async def` (pgqueuer 1.x refuses plain functions); its
# documented way to run blocking code is `await asyncio.to_thread(...)`. One
# connection, as in pgqueuer's examples: asyncpg (what `pgq run` picks first
# when it is installed) or psycopg 3.


async def _io(job: Job) -> None:
    """Wait 20 ms on the worker's event loop."""
    await asyncio.sleep(IO_SECONDS)


async def _io_sync(job: Job) -> None:
    """Wait 20 ms in a thread, as blocking client code would."""
    await asyncio.to_thread(time.sleep, IO_SECONDS)


@contextlib.asynccontextmanager
async def pgqueuer_worker(arguments: list[str]) -> AsyncIterator[pgqueuer.PgQueuer]:
    """The factory `pgq run` calls, with [CONCURRENCY, async|sync, asyncpg|psycopg].

    One entrypoint, benchmark_io, with concurrency_limit=CONCURRENCY.
    """
    concurrency, kind, driver = int(arguments[0]), arguments[1], arguments[2]
    async with _driver(driver) as opened:
        queuer = pgqueuer.PgQueuer(opened)
        queuer.entrypoint("benchmark_io", concurrency_limit=concurrency)(
            _io_sync if kind == "sync" else _io
        )
        yield queuer


@contextlib.asynccontextmanager
async def _driver(name: str) -> AsyncIterator[Driver]:
    """One connection, with the search_path and application_name set."""
    url, settings = os.environ["PEER_DATABASE_URL"], libpq_settings()
    if name == "psycopg":
        conninfo = make_conninfo(url, **settings)
        async with await psycopg.AsyncConnection.connect(
            conninfo, autocommit=True
        ) as connection:
            yield PsycopgDriver(connection)
        return
    server_settings = {
        "search_path": os.environ["PEER_SCHEMA"],
        "application_name": os.environ["PEER_APPLICATION_NAME"],
    }
    connection = await asyncpg.connect(url, server_settings=server_settings)
    try:
        yield AsyncpgDriver(connection)
    finally:
        await connection.close()


def main(arguments: list[str]) -> None:
    """Run one pgqueuer worker until its queue is empty, as `pgq run` would."""
    logging.basicConfig(level=logging.WARNING)
    factory = functools.partial(pgqueuer_worker, arguments)
    uvloop.run(pgqueuer.run(factory, mode=QueueExecutionMode.drain))
