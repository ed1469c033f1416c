"""The plans of the outbox's hot and periodic queries, whatever the statistics.

A backlog is when the outbox must drain fastest, and when the table's
statistics are most likely wrong: a new table never analyzed, one analyzed
while nearly empty, one analyzed before the backlog grew a hundredfold.
Planned from such statistics, PostgreSQL took the claim for a bitmap heap
scan of every ready row and a sort, 165 ms a batch over 100,000 events
instead of 0.14 ms (docs/architecture.md, "Plans").

Each test builds an outbox table in one of those states, in a schema of its
own with autovacuum off (so no analyze happens by luck), runs the real code
against it, and asserts the shape of the plan PostgreSQL chose for each
statement, taken with EXPLAIN on the same connection right before the
statement itself runs, so under the settings it runs with. Shapes, not
timings: no sequential or bitmap heap scan of the outbox table, and no sort.
"""

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection

from outbox import monitoring, ordering, publish
from outbox.handling import Backoff
from outbox.maintenance import Maintenance
from outbox.models import OutboxEvent
from outbox.pruning import prune

pytestmark = pytest.mark.django_db

TABLE = OutboxEvent._meta.db_table
#: Enough ready rows for a never-analyzed table's claim to be planned as a
#: bitmap heap scan and a sort (about 50,000 on PostgreSQL 15).
BACKLOG = 60_000


def never_analyzed(cursor: Any) -> None:
    _insert(cursor, BACKLOG)


def analyzed_nearly_empty(cursor: Any) -> None:
    _insert(cursor, 10, status="completed")
    cursor.execute(f"ANALYZE {TABLE}")
    _insert(cursor, BACKLOG)


def analyzed_before_the_backlog_grew(cursor: Any) -> None:
    _insert(cursor, BACKLOG // 100)
    cursor.execute(f"ANALYZE {TABLE}")
    _insert(cursor, BACKLOG)


STATES = [never_analyzed, analyzed_nearly_empty, analyzed_before_the_backlog_grew]


@pytest.fixture(scope="module")
def backlogs(django_db_setup: None, django_db_blocker: Any) -> Iterator[None]:
    """One outbox table per state, with a backlog: built once for the module.

    Copies of the table (their indexes included), each in a schema of its
    own, committed so the tests share them; dropped at the end.
    """
    with django_db_blocker.unblock(), connection.cursor() as cursor:
        for state in STATES:
            schema = _schema(state)
            cursor.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            cursor.execute(f"CREATE SCHEMA {schema}")
            cursor.execute(
                f"CREATE TABLE {schema}.{TABLE} (LIKE public.{TABLE} INCLUDING ALL) "
                "WITH (autovacuum_enabled = false)"
            )
            cursor.execute(f"SET search_path = {schema}, public")
            state(cursor)
            # A few events of the other kinds the queries look for.
            _insert(
                cursor, 50, status="processing", locked_until="now() - interval '1 h'"
            )
            _insert(cursor, 50, key="k", waiting=True)
            _insert(
                cursor, 50, status="completed", completed_at="now() - interval '9 d'"
            )
            _insert(cursor, 50, status="failed")
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
        OutboxEvent.objects.claim(worker_id="w", limit=32, lease=timedelta(seconds=30))

    assert_bounded(taken, expect=1)


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

    assert rescued
    assert_bounded(taken, expect=1)


def test_key_head_lookups__read_the_key_index(backlog: None) -> None:
    with plans() as taken:
        ordering.advance({"k"}, "default")

    assert_bounded(taken, expect=1)


def test_publish_with_a_key__finds_the_keys_head_by_the_key_index(
    backlog: None,
) -> None:
    with plans() as taken:
        publish("plan.test", {}, key="k")

    assert_bounded(taken, expect=1)


def test_orphaned_key_sweep__reads_the_key_index(backlog: None) -> None:
    with plans() as taken:
        ordering.promote_orphaned_heads("default")

    assert_bounded(taken, expect=2)


def test_status_summary_and_lag__read_indexes(backlog: None) -> None:
    with plans() as taken:
        monitoring.collect_status()

    assert_bounded(taken, expect=3)


def test_pruning__reads_old_events_by_index(backlog: None) -> None:
    with plans() as taken:
        pruned = prune(older_than=timedelta(days=1), include_failed=True)

    assert (pruned.completed, pruned.failed) == (50, 50)
    assert_bounded(taken, expect=4)


def test_claim__puts_the_callers_sort_setting_back(backlog: None) -> None:
    for setting in ("on", "off"):
        with connection.cursor() as cursor:
            cursor.execute("SELECT set_config('enable_sort', %s, true)", [setting])
            OutboxEvent.objects.claim(
                worker_id="w", limit=32, lease=timedelta(seconds=30)
            )
            cursor.execute("SHOW enable_sort")
            assert cursor.fetchone()[0] == setting


def assert_bounded(taken: list[tuple[str, dict[str, Any]]], *, expect: int) -> None:
    """Each statement on the outbox table reads it through an index, unsorted.

    A bitmap heap scan is bounded when it fetches rows by primary key (the
    claim's UPDATE of the ids its locking read returned); of anything else
    it reads every row that matches.
    """
    on_table = [(sql, plan) for sql, plan in taken if TABLE in sql]
    assert len(on_table) >= expect, [sql for sql, _ in taken]
    for sql, plan in on_table:
        unbounded = [node["Node Type"] for node in _nodes(plan) if _unbounded(node)]
        assert not unbounded, f"{unbounded} in\n{sql}\n{json.dumps(plan, indent=1)}"


def _unbounded(node: dict[str, Any]) -> bool:
    kind = node["Node Type"]
    if kind == "Sort":
        return True
    if node.get("Relation Name") != TABLE:
        return False
    if kind == "Seq Scan":
        return True
    if kind == "Bitmap Heap Scan":
        indexes = {
            child.get("Index Name", "") for child in _nodes(node) if child is not node
        }
        return not all(name.endswith("_pkey") for name in indexes if name)
    return False


@contextmanager
def plans() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """Collect the plan of each statement the code runs, as it runs it."""
    taken: list[tuple[str, dict[str, Any]]] = []

    def explain_first(
        execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        if not many and sql.lstrip().upper().startswith(
            ("SELECT", "WITH", "INSERT", "UPDATE", "DELETE")
        ):
            raw = context["cursor"].cursor
            raw.execute(f"EXPLAIN (FORMAT JSON) {sql}", params)
            document = raw.fetchone()[0]
            if isinstance(document, str):
                document = json.loads(document)
            taken.append((sql, document[0]["Plan"]))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(explain_first):
        yield taken


def _schema(state: Callable[[Any], None]) -> str:
    return f"outbox_plans_{state.__name__}"


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
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
    completed_at: str = "NULL",
) -> None:
    # S608: the values are the test's own constants.
    cursor.execute(
        f"INSERT INTO {TABLE} (uuid, event_type, payload, key, status, waiting, "  # noqa: S608
        "attempts, max_attempts, available_at, locked_by, locked_until, "
        "lease_token, created_at, completed_at, last_error, history, discarded_by) "
        "SELECT gen_random_uuid(), 'plan.test', '{}', %s, %s, %s, 1, 5, "
        "now() - interval '1 hour' + g * interval '1 ms', 'dead', "
        f"{locked_until}, 1, now() - interval '9 d', {completed_at}, '', '[]', '' "
        "FROM generate_series(1, %s) g",
        [key, status, waiting, count],
    )
