"""Other sessions for race tests, and what PostgreSQL says they are doing.

So a test sees that the race happened instead of sleeping and hoping.
"""

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from django.db import connection, connections, transaction


def connect() -> psycopg.Connection:
    """Open a connection of its own to the test database, in autocommit."""
    settings = connection.settings_dict
    return psycopg.connect(
        host=settings["HOST"] or "127.0.0.1",
        port=settings["PORT"] or 5432,
        user=settings["USER"],
        dbname=settings["NAME"],
        autocommit=True,
    )


def backend_pid() -> int:
    """Return the backend pid of this thread's connection, opening it if needed."""
    connection.ensure_connection()
    return connection.connection.info.backend_pid


def terminate(backend: int) -> None:
    """End that session from another one, as a crash would; return once it is gone."""
    with connect() as killer:
        # With a timeout, pg_terminate_backend waits until the session exits.
        [(terminated,)] = killer.execute(
            "SELECT pg_terminate_backend(%s, 5000)", [backend]
        ).fetchall()
        [(left,)] = killer.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [backend]
        ).fetchall()
    assert (terminated, left) == (True, 0)


def waiting_for_a_lock(backend: int, *, locktype: str | None = None) -> bool:
    """Whether the session with this backend pid waits for a lock right now.

    With locktype ("advisory", "transactionid", ...), only for that kind.
    """
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT 1 FROM pg_locks WHERE pid = %s AND NOT granted"
            " AND (%s::text IS NULL OR locktype = %s)",
            [backend, locktype, locktype],
        )
        return cursor.fetchone() is not None


class InThread:
    """Run a function on a thread, so on a database connection, of its own."""

    def __init__(self, function: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(function,))
        self.thread.start()

    def _run(self, function: Callable[[], Any]) -> None:
        try:
            self.result = function()
        except BaseException as error:  # re-raised by join(), in the test
            self.error = error
        finally:
            connections.close_all()

    def join(self) -> Any:
        """Wait for the function; return its result or raise its error."""
        self.thread.join(10)
        assert not self.thread.is_alive(), "the thread is still running"
        if self.error is not None:
            raise self.error
        return self.result


@contextmanager
def open_transaction(function: Callable[[], Any]) -> Iterator[Any]:
    """Run function in another session's transaction; commit when the block ends.

    Yields the function's result while its transaction, and its locks, stay
    open.
    """
    done, commit = threading.Event(), threading.Event()
    results: list[Any] = []

    def hold() -> None:
        with transaction.atomic():
            results.append(function())
            done.set()
            commit.wait(10)

    holder = InThread(hold)
    while not done.wait(0.01):
        if not holder.thread.is_alive():
            holder.join()  # raises the function's error
            pytest.fail("the transaction ended before it was held open")
    try:
        yield results[0]
    finally:
        commit.set()
        holder.join()
