"""New deliveries: the rows publish() writes, and the statement that writes them.

An event is one row per subscriber (outbox.registry), each that subscriber's
delivery. publish() and publish_many() build them as Delivery values,
validated and with the payload already encoded, and insert() writes any
number of them with one statement and returns them as saved OutboxEvents.

On PostgreSQL that statement is written here once, from the model's
metadata, rather than compiled by the ORM for every call: the ORM's INSERT
of a row of 28 columns cost more than PostgreSQL takes to run it, and
bulk_create() adapts every value of every row in Python. An event's few
rows travel as the parameters of a VALUES list, which PostgreSQL plans
fastest; more rows as one JSON document that jsonb_to_recordset() unpacks,
so a thousand rows are one parameter. Either way the payload goes as
publish() encoded it for its checks, never encoded twice. The statement
also checks, per keyed row, whether its lane has an earlier unfinished
event (outbox.ordering), under the key's lock the caller holds. SQLite, the
embedded development database, takes the ORM's bulk_create().
"""

import functools
import json
import operator
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

# The C function json.dumps() uses for a str: a quoted, escaped JSON string.
from json.encoder import encode_basestring_ascii as _string
from typing import Any

from django.db import connections
from django.db.models.base import ModelState

from outbox import statements
from outbox.models import UNFINISHED, OutboxEvent, Status


@dataclass(slots=True)
class Delivery:
    """One row to insert: an event's delivery to one subscriber."""

    uuid: uuid.UUID
    event_type: str
    subscriber: str
    payload: Any
    #: The payload as JSON, as publish() checked it and JSONField would write it.
    payload_json: str
    key: str
    idempotency_key: str | None
    queue_name: str
    max_attempts: int
    available_at: datetime | None
    trace_context: dict[str, str] | None
    #: Whether an earlier new row of the same lane precedes it (ordering.py).
    waiting: bool = False


#: The fields a Delivery sets, as the recordset's columns and their SQL types;
#: payload_json travels as "payload".
_COLUMNS = {
    "uuid": "uuid",
    "event_type": "text",
    "subscriber": "text",
    "payload": "jsonb",
    "key": "text",
    "idempotency_key": "text",
    "queue_name": "text",
    "max_attempts": "integer",
    "trace_context": "jsonb",
    "available_at": "timestamptz",
    "waiting": "boolean",
}
#: Up to this many rows are the parameters of a VALUES list; more, a document.
LISTED_ROWS = 8
#: What the statement returns for each row, in this order.
_RETURNED = ("id", "waiting", "available_at", "created_at")


def insert(rows: Sequence[Delivery], using: str) -> list[OutboxEvent]:
    """Insert the rows with one statement; return them saved, in order.

    Ids follow the rows' order, which is what orders a key's events. Call
    with the keys of keyed rows locked (ordering.join_queues()).
    """
    if connections[using].vendor != "postgresql":
        events = [_unsaved(row) for row in rows]
        OutboxEvent.objects.using(using).bulk_create(events)
        return events
    keyed = any(row.key for row in rows)
    listed = len(rows) if len(rows) <= LISTED_ROWS else 0
    sql, names = _statement(using, keyed=keyed, listed=listed)
    if listed:
        parameters = [value for row in rows for value in _values(row, using, names)]
    else:
        parameters = [_document(rows, using)]
    with connections[using].cursor() as cursor:
        cursor.execute(sql, parameters)
        returned = cursor.fetchall()
    # RETURNING gives the rows in the order they were inserted, the VALUES
    # list's or the document's: bulk_create()'s UNNEST relies on the same.
    pairs = zip(rows, returned, strict=True)
    return [_saved(row, values, using) for row, values in pairs]


@functools.cache
def _statement(using: str, *, keyed: bool, listed: int) -> tuple[str, list[str]]:
    """The INSERT, and the fields each listed row's parameters are, in order.

    listed rows as a VALUES list of parameters, or (0) rows from one JSON
    document; keyed, with the check of each keyed row's lane. Without a
    keyed row the check is left out: PostgreSQL plans a subquery for every
    statement that has one, run or not, which costs more than the rest of a
    one-row INSERT. A VALUES list is written as one, not selected from (which
    cost a sixth more to plan and run).
    """
    column = statements.sql_names(using)
    table = column["table"]
    names: list[str] = []

    def value(name: str) -> str:
        """A Delivery field's value: a parameter, or the document row's."""
        if not listed:
            return f"r.{name}"
        names.append(name)
        return f"%s::{_COLUMNS[name]}"

    values = {name: value(name) for name in _COLUMNS}
    if keyed:
        values["waiting"] += f" OR ({_lane_busy(value, column, table)})"
    values["available_at"] = (
        f"COALESCE({values['available_at']}, statement_timestamp())"
    )
    # The columns a new row holds at their defaults, as the model has them
    # (tests/outbox/test_deliveries.py compares the two).
    values |= {
        "status": f"'{Status.PENDING}'",
        "attempts": "0",
        "locked_by": "''",
        "last_error": "''",
        "history": "'[]'",
        "discarded_by": "''",
    }
    if listed:
        row = f"({', '.join(values.values())})"
        source = f"VALUES {', '.join([row] * listed)}"
    else:
        recordset = ", ".join(f"{name} {kind}" for name, kind in _COLUMNS.items())
        source = (
            f"SELECT {', '.join(values.values())} "  # noqa: S608 - names
            f"FROM jsonb_to_recordset(%s::jsonb) AS r({recordset})"
        )
    sql = (
        f"INSERT INTO {table} ({', '.join(column[name] for name in values)}) "
        f"{source} RETURNING {', '.join(column[name] for name in _RETURNED)}"
    )
    return sql, names


def _lane_busy(value: Any, column: dict[str, str], table: str) -> str:
    """Whether a keyed row's lane has an unfinished event.

    Read from the partial index outbox_lane_unfinished_idx, under the key's
    lock the publisher holds. A scalar subquery: PostgreSQL may answer an
    EXISTS by hashing every unfinished keyed event once, which is what it
    guesses a function's hundred rows call for. In the index's order: a plain
    LIMIT 1 on a key whose completed history fills the table was planned as
    a scan of the table.
    """
    unfinished = ", ".join(f"'{status}'" for status in UNFINISHED)
    return (
        f"{value('key')} <> '' AND (SELECT e.{column['id']} FROM {table} AS e"  # noqa: S608 - names
        f" WHERE e.{column['key']} = {value('key')}"
        f" AND e.{column['subscriber']} = {value('subscriber')}"
        f" AND e.{column['status']} IN ({unfinished}) AND e.{column['key']} <> ''"
        f" ORDER BY e.{column['id']} LIMIT 1) IS NOT NULL"
    )


def _values(row: Delivery, using: str, names: list[str]) -> list[Any]:
    """The row's parameters, for the fields named."""
    context = row.trace_context
    fields = {
        "uuid": row.uuid,
        "event_type": row.event_type,
        "subscriber": row.subscriber,
        "payload": row.payload_json,
        "key": row.key,
        "idempotency_key": row.idempotency_key,
        "queue_name": row.queue_name,
        "max_attempts": row.max_attempts,
        "trace_context": None if context is None else json.dumps(context),
        "available_at": _available_at(row, using),
        "waiting": row.waiting,
    }
    return [fields[name] for name in names]


def _document(rows: Sequence[Delivery], using: str) -> str:
    """The rows as one JSON array, each payload embedded as publish() encoded it.

    Written out rather than json.dumps()'d row by row, which took longer
    than the database takes to insert the row.
    """
    parts = []
    for row in rows:
        available_at = _available_at(row, using)
        when = None if available_at is None else available_at.isoformat()
        context = row.trace_context
        parts.append(
            f'{{"payload":{row.payload_json},"uuid":"{row.uuid}",'
            f'"event_type":{_string(row.event_type)},'
            f'"subscriber":{_string(row.subscriber)},"key":{_string(row.key)},'
            f'"idempotency_key":{_optional_string(row.idempotency_key)},'
            f'"queue_name":{_string(row.queue_name)},'
            f'"max_attempts":{row.max_attempts:d},'
            f'"trace_context":{"null" if context is None else json.dumps(context)},'
            f'"available_at":{_optional_string(when)},'
            f'"waiting":{"true" if row.waiting else "false"}}}'
        )
    return f"[{','.join(parts)}]"


def _optional_string(text: str | None) -> str:
    return "null" if text is None else _string(text)


def _available_at(row: Delivery, using: str) -> datetime | None:
    """The row's available_at as Django would save it (a naive one made aware)."""
    if row.available_at is None:
        return None
    field = OutboxEvent._meta.get_field("available_at")
    return field.get_db_prep_value(row.available_at, connections[using])


#: The Delivery fields a saved OutboxEvent takes as they are.
_ROW_FIELDS = (
    "uuid",
    "event_type",
    "subscriber",
    "payload",
    "key",
    "idempotency_key",
    "queue_name",
    "max_attempts",
    "trace_context",
)
_row_values = operator.attrgetter(*_ROW_FIELDS)
#: A new row's field values at their defaults; the callable defaults apart,
#: so that each event gets its own list.
_DEFAULTS = {
    field.attname: field.get_default()
    for field in OutboxEvent._meta.concrete_fields
    if not (field.has_default() and callable(field.default))
}
_FRESH_DEFAULTS = [
    (field.attname, field.default)
    for field in OutboxEvent._meta.concrete_fields
    if field.has_default()
    and callable(field.default)
    and field.attname not in _ROW_FIELDS
]


def _saved(row: Delivery, returned: tuple[Any, ...], using: str) -> OutboxEvent:
    """The row as the OutboxEvent now stored, without a query.

    Made as Django unpickles a model instance, filling its __dict__: Model's
    __init__, with its pre_init and post_init signals, cost more per row
    than the database's insert of it. (Nothing in Django listens to them for
    a model without generic relations or image fields.)
    """
    values = _DEFAULTS.copy()
    for name, make in _FRESH_DEFAULTS:
        values[name] = make()
    values.update(zip(_ROW_FIELDS, _row_values(row), strict=True))
    values.update(zip(_RETURNED, returned, strict=True))
    state = ModelState()
    state.adding = False
    state.db = using
    values["_state"] = state
    event = OutboxEvent.__new__(OutboxEvent)
    event.__dict__ = values
    return event


def _unsaved(row: Delivery) -> OutboxEvent:
    fields = dict(zip(_ROW_FIELDS, _row_values(row), strict=True))
    if row.available_at is not None:
        fields["available_at"] = row.available_at  # else the database's clock
    return OutboxEvent(**fields, waiting=row.waiting)
