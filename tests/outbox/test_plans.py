"""The plans of the outbox's hot and periodic queries, whatever the statistics.

A backlog is when the outbox must drain fastest, and when the table's
statistics are most likely wrong: a new table never analyzed, one analyzed
while nearly empty, one analyzed before the backlog grew a hundredfold.
Planned from such statistics, PostgreSQL took the claim for a bitmap heap
scan of every ready row and a sort, 165 ms a batch over 100,000 events
instead of 0.14 ms (docs/architecture.md, "Plans").

The module builds an outbox table in each of those states, each in a schema
of its own with autovacuum off (so no analyze happens by luck); each test
runs the real code against one and checks every statement it sends to the
outbox table, run first under EXPLAIN ANALYZE on the same connection (in a
savepoint rolled back at once), so under the settings it runs with. Row
counts and shapes, not timings: no scan reads more rows than the work needs
(32 for a claim of 32, not the backlog); counts, which read what they count,
read it through an index, with no sequential scan and no sort.
"""

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection

from outbox import monitoring, ordering, pruning, publish
from outbox.handling import Backoff
from outbox.maintenance import Maintenance
from outbox.models import OutboxEvent
from outbox.worker import Worker

TABLE = OutboxEvent._meta.db_table
#: Enough ready rows for a never-analyzed table's claim to be planned as a
#: bitmap heap scan and a sort (about 50,000 on PostgreSQL 15).
BACKLOG = 60_000
#: Events of the other kinds the queries look for, besides the backlog.
FEW = 50
#: When the events old enough to prune were created and completed.
OLD = "now() - interval '10 days'"

Plan = dict[str, Any]
Taken = list[tuple[str, Plan]]


def never_analyzed(cursor: Any) -> None:
    _insert(cursor, BACKLOG)


def analyzed_nearly_empty(cursor: Any) -> None:
    # It holds only the events old enough to prune, inserted first.
    cursor.execute(f"ANALYZE {TABLE}")
    _insert(cursor, BACKLOG)


def analyzed_before_the_backlog_grew(cursor: Any) -> None:
    _insert(cursor, BACKLOG // 100)
    cursor.execute(f"ANALYZE {TABLE}")
    _insert(cursor, BACKLOG)


def analyzed_with_a_dominant_key(cursor: Any) -> None:
    # Most of the table is one key's history: a publisher of that key must
    # still find its lane's unfinished events by the lane index.
    _insert(cursor, 3 * BACKLOG, status="completed", key="k")
    _insert(cursor, BACKLOG)
    cursor.execute(f"ANALYZE {TABLE}")


STATES = [
    never_analyzed,
    analyzed_nearly_empty,
    analyzed_before_the_backlog_grew,
    analyzed_with_a_dominant_key,
]


@pytest.fixture(scope="module")
def backlogs(django_db_setup: None, django_db_blocker: Any) -> Iterator[None]:
    """One outbox table per state, with a backlog: built once for the module.

    Copies of the table (their indexes included), each in a schema of its
    own, committed so the tests share them; dropped at the end.
    """
    with django_db_blocker.unblock(), connection.cursor() as cursor:
        try:
            for state in STATES:
                schema = _schema(state)
                cursor.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
                cursor.execute(f"CREATE SCHEMA {schema}")
                cursor.execute(
                    f"CREATE TABLE {schema}.{TABLE} "
                    f"(LIKE public.{TABLE} INCLUDING ALL) "
                    "WITH (autovacuum_enabled = false)"
                )
                cursor.execute(f"SET search_path = {schema}, public")
                # Ids follow creation: the events old enough to prune first.
                _insert(cursor, FEW, status="completed", created_at=OLD)
                state(cursor)
                _insert(
                    cursor,
                    FEW,
                    status="processing",
                    locked_until="now() - interval '1 h'",
                )
                _insert(cursor, FEW, key="k", waiting=True)
        finally:
            cursor.execute("SET search_path TO DEFAULT")
    yield
    with django_db_blocker.unblock(), connection.cursor() as cursor:
        for state in STATES:
            cursor.execute(f"DROP SCHEMA {_schema(state)} CASCADE")


@pytest.fixture(params=STATES, ids=lambda state: state.__name__)
def backlog(request: pytest.FixtureRequest, backlogs: None, db: None) -> None:
    """Point this test's transaction at the table in one state."""
    with connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL search_path = {_schema(request.param)}, public")


def test_claim__reads_the_ready_index_in_order(backlog: None) -> None:
    with plans() as taken:
        batch = OutboxEvent.objects.claim(
            worker_id="w", limit=32, lease=timedelta(seconds=30)
        )

    assert len(batch) == 32
    assert_bounded(taken, statements=1, rows=100)


def test_claim_of_one_queue__reads_its_own_index_past_the_others_backlog(
    backlog: None,
) -> None:
    """A --queue worker does not step over the backlog of other queues."""
    with connection.cursor() as cursor:
        _insert(cursor, FEW, queue="reports")

    with plans() as taken:
        batch = OutboxEvent.objects.claim(
            worker_id="w", limit=32, lease=timedelta(seconds=30), queues=["reports"]
        )

    assert len(batch) == 32
    assert {event.queue_name for event in batch} == {"reports"}
    assert_bounded(taken, statements=1, rows=100)


def test_claim_of_several_queues__reads_each_queues_index_past_the_others_backlog(
    backlog: None,
) -> None:
    with connection.cursor() as cursor:
        _insert(cursor, FEW, queue="reports")
        _insert(cursor, FEW, queue="emails")

    with plans() as taken:
        batch = OutboxEvent.objects.claim(
            worker_id="w",
            limit=32,
            lease=timedelta(seconds=30),
            queues=["reports", "emails"],
        )

    assert len(batch) == 32
    assert {event.queue_name for event in batch} == {"reports", "emails"}
    # Each queue's read takes up to 32 in its index's order; the merge keeps 32.
    assert_bounded(taken, statements=1, rows=150)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("state", STATES, ids=lambda state: state.__name__)
def test_claim_in_autocommit__reads_the_ready_index_in_order(
    backlogs: None, state: Callable[[Any], None]
) -> None:
    """The worker's claim after a wake-up: no transaction of the caller's."""
    with connection.cursor() as cursor:
        cursor.execute(f"SET search_path = {_schema(state)}, public")
    try:
        with plans() as taken:
            batch = Worker(worker_id="w").claim(32)
        released = OutboxEvent.objects.filter(pk__in=[e.pk for e in batch]).update(
            status="pending", locked_by="", locked_until=None
        )
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SET search_path TO DEFAULT")

    assert released == 32
    assert_bounded(taken, statements=1, rows=100)


def test_lease_rescue__reads_the_processing_index(backlog: None) -> None:
    maintenance = Maintenance(
        using="default",
        worker_id="w",
        lease=timedelta(seconds=30),
        backoff=Backoff(1, 5),
        prune_after_days=None,
    )
    with plans() as taken:
        rescued = maintenance.rescue_expired()

    assert rescued == FEW
    assert_bounded(taken, statements=1, rows=2 * FEW)


def test_key_head_promotion__reads_the_key_index(backlog: None) -> None:
    with plans() as taken:
        ordering.advance({("k", "")}, "default")

    assert_bounded(taken, statements=1, rows=10)


def test_publish_with_a_key__finds_the_keys_head_by_the_key_index(
    backlog: None,
) -> None:
    with plans() as taken:
        publish("plan.test", {}, key="k")

    assert_bounded(taken, statements=1, rows=10)


def test_orphaned_key_sweep__reads_only_the_keyed_events(backlog: None) -> None:
    with plans() as taken:
        ordering.promote_orphaned_heads("default")

    assert_bounded(taken, statements=1, rows=2 * FEW)


def test_status_counts_and_lag__read_only_the_open_events(backlog: None) -> None:
    """Counting the open events reads them all, by its nature: through the
    status index, never the completed rows besides."""
    with plans() as taken:
        monitoring.collect_status()

    assert_bounded(taken, statements=3, rows=None)


def test_pruning__reads_the_old_events_not_the_table(backlog: None) -> None:
    older_than = timedelta(days=7)
    with plans() as taken:
        counted = pruning.count_prunable(older_than=older_than, include_failed=True)
        pruned = pruning.prune(older_than=older_than, include_failed=True)

    assert counted == {"completed": FEW, "failed": 0}
    assert (pruned.completed, pruned.failed) == (FEW, 0)
    # The horizon's walk of the old events, and the one event past them.
    assert_bounded(taken, statements=5, rows=FEW + 1)


def test_claim__puts_the_callers_settings_back(backlog: None) -> None:
    for setting in ("on", "off"):
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT set_config('enable_sort', %s, true), "
                "set_config('enable_seqscan', %s, true), "
                "set_config('jit', %s, true)",
                [setting, setting, setting],
            )
            OutboxEvent.objects.claim(
                worker_id="w", limit=32, lease=timedelta(seconds=30)
            )
            cursor.execute(
                "SELECT current_setting('enable_sort'), "
                "current_setting('enable_seqscan'), current_setting('jit')"
            )
            assert cursor.fetchone() == (setting, setting, setting)


def assert_bounded(taken: Taken, *, statements: int, rows: int | None) -> None:
    """Each statement on the outbox table reads at most rows of it in any one
    scan; or, for work that reads what it counts (rows None), reads it
    through an index, unsorted.

    A bitmap heap scan is bounded when it fetches rows by primary key (the
    claim's UPDATE of the ids its locking read returned); of anything else
    it reads every row that matches.
    """
    on_table = [(sql, plan) for sql, plan in taken if TABLE in sql]
    assert len(on_table) >= statements, [sql for sql, _ in taken]
    for sql, plan in on_table:
        problems = [
            f"{node['Node Type']} reading {_read(node)} rows"
            for node in _nodes(plan)
            if (_read(node) > rows if rows is not None else _unbounded(node))
        ]
        if plan.get("JIT"):
            problems.append(f"compiled with JIT: {plan['JIT']}")
        assert not problems, f"{problems} in\n{sql}\n{json.dumps(plan, indent=1)}"


def _unbounded(node: Plan) -> bool:
    kind = node["Node Type"]
    if "Sort" in kind:
        return True
    if node.get("Relation Name") != TABLE:
        return False
    if kind == "Seq Scan":
        return True
    if kind == "Bitmap Heap Scan":
        indexes = {child.get("Index Name", "") for child in _nodes(node)} - {""}
        return not all(name.endswith("_pkey") for name in indexes)
    return False


def _read(node: Plan) -> int:
    """How many rows of the outbox table a scan node looked at."""
    if node.get("Relation Name") != TABLE or "Scan" not in node["Node Type"]:
        return 0
    looked_at = (
        node.get("Actual Rows", 0)
        + node.get("Rows Removed by Filter", 0)
        + node.get("Rows Removed by Index Recheck", 0)
    )
    return int(looked_at * node.get("Actual Loops", 1))


@contextmanager
def plans() -> Iterator[Taken]:
    """Collect the plan of each statement the code runs, as it runs it.

    EXPLAIN ANALYZE runs the statement, so it runs in a savepoint rolled back
    at once: the settings of the transaction stay, its effects go.
    """
    taken: Taken = []

    def explain_first(
        execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        verb = sql.lstrip().split(None, 1)[0].upper()
        if not many and verb in {"SELECT", "WITH", "INSERT", "UPDATE", "DELETE"}:
            raw = context["cursor"].cursor
            assert not connection.get_autocommit(), f"outside a transaction: {sql}"
            raw.execute("SAVEPOINT outbox_plan")
            raw.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", params)
            document = raw.fetchone()[0]
            raw.execute("ROLLBACK TO SAVEPOINT outbox_plan")
            raw.execute("RELEASE SAVEPOINT outbox_plan")
            if isinstance(document, str):
                document = json.loads(document)
            # Kept beside the plan's nodes: compiling with JIT costs
            # hundreds of milliseconds, where these statements take one.
            taken.append((sql, {**document[0]["Plan"], "JIT": document[0].get("JIT")}))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(explain_first):
        yield taken


def _schema(state: Callable[[Any], None]) -> str:
    return f"outbox_plans_{state.__name__}"


def _nodes(plan: Plan) -> Iterator[Plan]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def _insert(
    cursor: Any,
    count: int,
    *,
    status: str = "pending",
    key: str = "",
    waiting: bool = False,
    locked_until: str = "NULL",
    created_at: str = "now()",
    queue: str = "default",
) -> None:
    completed_at = created_at if status == "completed" else "NULL"
    # S608: the values are the test's own constants.
    cursor.execute(
        f"INSERT INTO {TABLE} (uuid, event_type, payload, key, status, waiting, "  # noqa: S608
        "attempts, max_attempts, available_at, locked_by, locked_until, "
        "lease_token, created_at, completed_at, last_error, history, discarded_by, "
        "queue_name) "
        "SELECT gen_random_uuid(), 'plan.test', '{}', %s, %s, %s, 1, 5, "
        "now() - interval '1 hour' + g * interval '1 ms', 'dead', "
        f"{locked_until}, 1, {created_at}, {completed_at}, '', '[]', '', %s "
        "FROM generate_series(1, %s) g",
        [key, status, waiting, queue, count],
    )
