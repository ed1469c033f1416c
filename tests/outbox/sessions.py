"""Ask PostgreSQL what another session is doing, so races are seen, not hoped for."""

import psycopg
from django.db import connection


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
