"""The worker's hot statements, and the one private Django API they rely on.

statements.py compiles the ORM's select_for_update(skip_locked=True) query
with QuerySet.query.get_compiler(...).as_sql(), which Django does not
document. These tests run on every supported Django version (make test and
make test-compat) and fail if that stops giving the ORM's own SQL.
"""

from datetime import timedelta
from typing import Any

import pytest
from django.db import connection, transaction

from outbox import publish, statements
from outbox.models import OutboxEvent, Status

pytestmark = [pytest.mark.sqlite, pytest.mark.django_db]


def test_ready_sql__is_the_orms_locking_read() -> None:
    with transaction.atomic():
        sql, params = statements._ready_sql("default", 7, ())

    assert sql.lstrip().upper().startswith("SELECT")
    assert "LIMIT 7" in sql.upper()
    if connection.features.has_select_for_update_skip_locked:
        assert sql.upper().rstrip().endswith("FOR UPDATE SKIP LOCKED")
    # The same rows, in the same order, as the QuerySet it came from.
    for _ in range(3):
        publish("x", {})
    with transaction.atomic():
        ids = [row[0] for row in _rows(sql, params)]
        expected = list(OutboxEvent.objects.ready().values_list("pk", flat=True)[:7])
    assert ids == expected


def _rows(sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


def test_claim__returns_the_events_as_claimed_oldest_first() -> None:
    published = [publish("x", {"n": n}) for n in range(3)]

    with transaction.atomic():
        batch = OutboxEvent.objects.claim(
            worker_id="w", limit=2, lease=timedelta(seconds=30)
        )

    assert [event.pk for event in batch] == [event.pk for event in published[:2]]
    claimed = batch.events[0]
    assert (claimed.status, claimed.attempts, claimed.locked_by) == (
        Status.PROCESSING,
        1,
        "w",
    )
    assert claimed.lease_token == batch.token
    assert claimed.payload == {"n": 0}
    stored = OutboxEvent.objects.get(pk=claimed.pk)
    assert stored.locked_until is not None
    assert stored.locked_until > stored.available_at
    assert stored.lease_token == batch.token


def test_fenced_statements__touch_only_rows_under_their_token() -> None:
    ours, theirs = publish("x", {}), publish("x", {})
    with transaction.atomic():
        batch = OutboxEvent.objects.claim(
            worker_id="w", limit=2, lease=timedelta(seconds=30)
        )
    token = batch.token

    assert statements.complete(
        [(ours.pk, token), (theirs.pk, token + 1)], using="default"
    ) == {ours.pk}
    assert statements.release([(ours.pk, token)], using="default") == set()  # done
    assert statements.release([(theirs.pk, token)], using="default") == {theirs.pk}
    released = OutboxEvent.objects.get(pk=theirs.pk)
    assert (released.status, released.attempts, released.locked_by) == (
        Status.PENDING,
        0,
        "",
    )
    assert OutboxEvent.objects.get(pk=ours.pk).completed_at is not None
