"""Ask PostgreSQL what another session is doing, so races are seen, not hoped for."""

from django.db import connection


def backend_pid() -> int:
    """Return the backend pid of this thread's connection, opening it if needed."""
    connection.ensure_connection()
    return connection.connection.info.backend_pid


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
