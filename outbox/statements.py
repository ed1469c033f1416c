"""The worker's hot statements, written once from the model's metadata.

A worker runs the same three statements for every batch: the claim, the
completion of the events whose handlers returned, and the release of events
it never started. Building them through the ORM for every batch cost more
than PostgreSQL takes to run them, so they are written here, as plain SQL
whose table and column names come from OutboxEvent._meta and whose text is
cached per batch size. Everything else (failures, the heartbeat, the rescue,
operators' actions) is rare and goes through the ORM.

The claim's locking read stays the ORM's own
select_for_update(skip_locked=True) query: compiling a QuerySet to SQL is
not a public API, so tests/outbox/test_statements.py guards it on every
supported Django version.

Both supported databases run the same statements; only the clock differs.
The database's clock is used, never the worker's, as for publish().
"""

import contextlib
import functools
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

from django.db import NotSupportedError, connections, transaction
from psycopg.pq import TransactionStatus

from outbox.models import OutboxEvent, Status

#: A claimed event: (id, lease token), the pair every outcome is fenced on.
Held = tuple[int, int]

_NOW = {
    "postgresql": "statement_timestamp()",
    # The text Django's Now() writes on SQLite, so comparisons stay textual.
    "sqlite": "STRFTIME('%%Y-%%m-%%d %%H:%%M:%%f', 'NOW')",
}
#: The claimed ids, as the UPDATE looks them up. On PostgreSQL an array, so
#: the plan is an index scan of the primary key whatever the statistics say:
#: with IN (SELECT ...) it may hash the CTE and scan the whole table.
_CLAIMED_IDS = {
    "postgresql": "= ANY(ARRAY(SELECT * FROM claimed))",
    "sqlite": "IN (SELECT * FROM claimed)",
}
_LATER = {
    "postgresql": "statement_timestamp() + %s",
    "sqlite": "STRFTIME('%%Y-%%m-%%d %%H:%%M:%%f', 'NOW', %s)",
}


@functools.cache
def sql_names(using: str) -> dict[str, str]:
    """Map "table" and each concrete field's name to its quoted SQL name."""
    quote = connections[using].ops.quote_name
    names = {
        field.name: quote(field.column)
        for field in OutboxEvent._meta.concrete_fields
        if field.column is not None
    }
    return {**names, "table": quote(OutboxEvent._meta.db_table)}


def _vendor(using: str) -> str:
    vendor = connections[using].vendor
    if vendor not in _NOW:
        raise NotSupportedError(
            f"The outbox worker runs on PostgreSQL or SQLite, not {vendor}."
        )
    return vendor


def _interval(using: str, duration: timedelta) -> Any:
    if _vendor(using) == "postgresql":
        return duration
    return f"+{duration.total_seconds():.3f} seconds"


def claim(
    *,
    using: str,
    limit: int,
    worker_id: str,
    token: int,
    lease: timedelta,
    queues: tuple[str, ...] = (),
) -> list[OutboxEvent]:
    """Lock up to limit ready events and lease them, in one statement.

    In autocommit it opens a transaction of its own (see in_index_order()).
    Returns the events as claimed (processing, attempt counted, the token
    set, started_at and last_attempted_at stamped), oldest first. Given
    queues (sorted), only events of those queues.
    """
    sql = _claim_sql(using, limit, queues)
    params = [
        *_ready_sql(using, limit, queues)[1],
        Status.PROCESSING,
        worker_id,
        _interval(using, lease),
        token,
    ]
    with in_index_order(using):
        events = list(OutboxEvent.objects.using(using).raw(sql, params))
    events.sort(key=lambda event: (event.available_at, event.pk))
    return events


#: The plans in_index_order() rules out: each reads, or sorts, rows in
#: proportion to what matches, where an ordered index scan stops at LIMIT.
#: And JIT: a plan that keeps a disabled node (the sort merging several
#: queues' reads, of a few rows) carries its penalty, 1e10, in its cost,
#: past jit_above_cost, so PostgreSQL 15 would compile every claim, 200 ms
#: of JIT for a statement of one. Incremental sorts too: the status counts
#: group by (status, subscriber), which the status index orders by status
#: alone; hashed, they read each open row once and sort nothing.
_UNBOUNDED_PLANS = (
    "enable_seqscan",
    "enable_bitmapscan",
    "enable_sort",
    "enable_incremental_sort",
    "jit",
)
#: Read the settings as they are, and turn them off for the transaction.
_PLANS_OFF = "SELECT " + ", ".join(
    [f"current_setting('{name}')" for name in _UNBOUNDED_PLANS]
    + [f"set_config('{name}', 'off', true)" for name in _UNBOUNDED_PLANS]
)
#: Put them back as they were.
_PLANS_BACK = "SELECT " + ", ".join(
    f"set_config('{name}', %s, true)" for name in _UNBOUNDED_PLANS
)


@contextlib.contextmanager
def in_index_order(using: str) -> Iterator[None]:
    """Plan the statements run inside as index scans, whatever the statistics.

    The claim reads the oldest rows of a partial index, LIMIT a batch; the
    operators' counts and ready lag read partial indexes too. (The rescue,
    the sweep and the key lookups keep to their indexes without help, and the
    sweep, given these settings, walked the primary key instead: use this
    only where tests/outbox/test_plans.py shows it helps.)

    Planned from missing or stale statistics (a table never analyzed,
    analyzed while nearly empty, or grown since), PostgreSQL estimates a
    handful of matching rows and reads them with a bitmap heap scan and a
    sort, or a sequential scan: every ready row, for every batch,
    so a claim costs time in proportion to the backlog (165 ms for 32 rows
    over 100,000, against 0.14 ms for the index scan). With sequential
    scans, bitmap scans and sorts disabled, the index scan is the plan left,
    however few rows the planner expects.

    The settings are local to a transaction: the caller's, and then put back
    as they were on the way out, or in autocommit one opened here, which
    ends with the block. SQLite plans from its indexes: nothing to do.
    """
    if _vendor(using) != "postgresql":
        yield
        return
    connection = connections[using]
    own_transaction = connection.get_autocommit()
    with transaction.atomic(using=using, savepoint=False):
        with connection.cursor() as cursor:
            cursor.execute(_PLANS_OFF)
            settings = cursor.fetchone()[: len(_UNBOUNDED_PLANS)]
            yield
            if not own_transaction:
                cursor.execute(_PLANS_BACK, settings)


@functools.cache
def _claim_sql(using: str, limit: int, queues: tuple[str, ...]) -> str:
    n = sql_names(using)
    # Every column but the history, read only on failure (and then loaded).
    returned = ", ".join(
        name for field, name in n.items() if field not in ("table", "history")
    )
    # MATERIALIZED: the locking read runs once, before the UPDATE, whatever
    # the planner would make of it inlined.
    now = _NOW[_vendor(using)]
    return (
        f"WITH claimed AS MATERIALIZED ({_ready_sql(using, limit, queues)[0]}) "  # noqa: S608
        f"UPDATE {n['table']} SET {n['status']} = %s, "
        f"{n['attempts']} = {n['attempts']} + 1, {n['locked_by']} = %s, "
        f"{n['locked_until']} = {_LATER[_vendor(using)]}, {n['lease_token']} = %s, "
        f"{n['started_at']} = COALESCE({n['started_at']}, {now}), "
        f"{n['last_attempted_at']} = {now} "
        f"WHERE {n['id']} {_CLAIMED_IDS[_vendor(using)]} "
        f"RETURNING {returned}"
    )


@functools.cache
def _ready_sql(
    using: str, limit: int, queues: tuple[str, ...]
) -> tuple[str, tuple[Any, ...]]:
    """The locking read of up to limit ready ids, compiled once per limit and queues.

    Every queue, or one: the ORM's SELECT id ... FOR UPDATE SKIP LOCKED.
    Several queues: one such read per queue, each from the queue's own index
    in order, merged oldest first. (One read filtering several queues could
    only use outbox_ready_idx, and would step over every other queue's
    ready events ahead of theirs.) Each read locks up to limit rows; those
    the merge leaves out stay locked, unclaimed, until the claim commits.
    """
    if len(queues) <= 1:
        return _compiled(
            OutboxEvent.objects.using(using)
            .ready(queues)
            .select_for_update(skip_locked=True)
            .values("pk")[:limit],
            using,
        )
    reads: list[str] = []
    params: list[Any] = []
    for number, queue in enumerate(queues):
        sql, read_params = _compiled(
            OutboxEvent.objects.using(using)
            .ready((queue,))
            .select_for_update(skip_locked=True)
            .values("pk", "available_at")[:limit],
            using,
        )
        reads.append(f"queue_{number} AS MATERIALIZED ({sql})")
        params += read_params
    merged = " UNION ALL ".join(
        f"SELECT * FROM queue_{number}"  # noqa: S608 - numbered names, no values
        for number in range(len(queues))
    )
    sql = (
        f"WITH {', '.join(reads)} SELECT pk FROM ({merged}) AS ready "  # noqa: S608
        f"ORDER BY available_at, pk LIMIT {int(limit)}"
    )
    return sql, tuple(params)


def _compiled(query: Any, using: str) -> tuple[str, tuple[Any, ...]]:
    # Not a public API (guarded by tests/outbox/test_statements.py). The
    # compiler refuses FOR UPDATE in autocommit, where a plain SELECT would
    # drop its locks at once; here the locking read is part of the claim's
    # UPDATE, which holds them to its end, so compile it in an (empty)
    # transaction.
    with transaction.atomic(using=using):
        sql, params = query.query.get_compiler(using=using).as_sql()
    return sql, tuple(params)


def complete(held: Sequence[Held], *, using: str) -> set[int]:
    """Mark completed the events still held under these tokens; return their ids."""
    if not held:
        return set()
    sql = _fenced_sql(using, len(held), "complete")
    return _run_fenced(using, sql, [Status.COMPLETED], held)


def release(held: Sequence[Held], *, using: str) -> set[int]:
    """Give back unstarted events still held, uncharged; return their ids."""
    if not held:
        return set()
    sql = _fenced_sql(using, len(held), "release")
    return _run_fenced(using, sql, [Status.PENDING, ""], held)


def extend(held: Sequence[Held], *, using: str, lease: timedelta) -> set[int]:
    """Push back the leases of events still held; return their ids."""
    if not held:
        return set()
    sql = _fenced_sql(using, len(held), "extend")
    return _run_fenced(using, sql, [_interval(using, lease)], held)


@functools.cache
def _fenced_sql(using: str, count: int, change: str) -> str:
    """An UPDATE of the rows that still carry the claim's token, if processing.

    The fence: a worker whose lease expired, and whose event was rescued and
    claimed again (even by a worker with the same id), matches nothing.
    """
    n = sql_names(using)
    assignments = {
        "complete": f"{n['status']} = %s, {n['completed_at']} = "
        f"{_NOW[_vendor(using)]}, {n['locked_until']} = NULL",
        # Never started: as if never claimed, its first start included.
        "release": f"{n['status']} = %s, {n['attempts']} = {n['attempts']} - 1, "
        f"{n['locked_by']} = %s, {n['locked_until']} = NULL, {n['started_at']} = "
        f"CASE WHEN {n['attempts']} = 1 THEN NULL ELSE {n['started_at']} END",
        "extend": f"{n['locked_until']} = {_LATER[_vendor(using)]}",
    }[change]
    # S608: the names come from the model's metadata; values are parameters.
    return (
        f"UPDATE {n['table']} SET {assignments} WHERE {_held_rows(using, count)} "  # noqa: S608
        f"AND {n['status']} = %s RETURNING {n['id']}"
    )


def _held_rows(using: str, count: int) -> str:
    """Match the rows of these (id, token) pairs, looked up by primary key.

    The ids come first, as a list the primary key's index looks up (the
    pairs alone may be planned as a scan of the whole table); then the exact
    pairs, the fence. PostgreSQL takes each list as one array parameter.
    """
    n = sql_names(using)
    if _vendor(using) == "postgresql":
        pair = f"({n['id']}, {n['lease_token']})"
        unnest = "(SELECT * FROM unnest(%s::bigint[], %s::bigint[]))"
        return f"{n['id']} = ANY(%s::bigint[]) AND {pair} IN {unnest}"
    ids = ", ".join(["%s"] * count)
    pairs = ", ".join(["(%s, %s)"] * count)
    return (
        f"{n['id']} IN ({ids}) AND ({n['id']}, {n['lease_token']}) IN (VALUES {pairs})"
    )


def _run_fenced(
    using: str, sql: str, values: list[Any], held: Sequence[Held]
) -> set[int]:
    ids = [pk for pk, _ in held]
    if _vendor(using) == "postgresql":
        tokens = [token for _, token in held]
        params = [*values, _array(ids), _array(ids), _array(tokens)]
    else:
        params = [*values, *ids]
        for pk, token in held:
            params += (pk, token)
    params.append(Status.PROCESSING)
    with connections[using].cursor() as cursor:
        cursor.execute(sql, params)
        return {row[0] for row in cursor.fetchall()}


def _array(numbers: list[int]) -> str:
    """An array literal for a %s::bigint[] parameter.

    Joined here: psycopg's client-side binding quotes a list element by
    element, with a regular expression each, for every id of every batch.
    """
    return "{" + ",".join(map(str, numbers)) + "}"


class WriteCheck:
    """Whether a handler's transaction wrote anything.

    Make it at the start of a handler's transaction and ask wrote() at its
    end. On PostgreSQL the answer covers the whole transaction, so inside an
    outer one that wrote (drain() in a test) it is True: the handler's mark
    is then written in its transaction, which is safe. A handler that only
    read, or never queried, needs no commit of its
    own; its completion is recorded with the batch's. Neither question costs
    a round trip unless the handler queried:

    - PostgreSQL: psycopg sends BEGIN with the first query, so a connection
      still idle ran none; otherwise the server says whether it assigned a
      transaction id, which it does at the first write.
    - SQLite: the count of rows changed on the connection moved.
    """

    def __init__(self, using: str) -> None:
        self._connection = connections[using]
        self._connection.ensure_connection()
        self._postgresql = _vendor(using) == "postgresql"
        self._changes = 0 if self._postgresql else self._sqlite_changes()

    def wrote(self) -> bool:
        if not self._postgresql:
            return self._sqlite_changes() != self._changes
        status = self._connection.connection.info.transaction_status
        if status == TransactionStatus.IDLE:
            return False
        with self._connection.cursor() as cursor:
            cursor.execute("SELECT pg_current_xact_id_if_assigned() IS NOT NULL")
            return bool(cursor.fetchone()[0])

    def _sqlite_changes(self) -> int:
        return int(self._connection.connection.total_changes)
