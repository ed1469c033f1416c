"""ORM updates compiled once and re-run with fresh values.

The worker runs the same two UPDATEs for every batch, with only the event ids
and the lease token changing. Django compiles a 32-id UPDATE in more time
than PostgreSQL takes to run it, so CompiledUpdate compiles the ORM's
statement once per number of ids, with sentinel values (negative ids and
token, which real ones never are) that it swaps for the real values on each
run. The SQL is still the ORM's, for every database backend.
"""

from collections.abc import Callable, Sequence
from typing import Any

from django.db import connections
from django.db.models import QuerySet
from django.db.models.sql import UpdateQuery

from outbox.models import OutboxEvent

#: Builds the update: (queryset filtered by the given ids and token, values).
UpdateBuilder = Callable[[list[int], int], tuple[QuerySet[OutboxEvent], dict[str, Any]]]
_TOKEN_SENTINEL = -(2**62)


class CompiledUpdate:
    def __init__(self, build: UpdateBuilder, *, using: str) -> None:
        self.build = build
        self.using = using
        self._compiled: dict[int, tuple[str, list[Any], dict[int, int], int]] = {}

    def run(self, ids: Sequence[int], token: int) -> int:
        """Run the update for these ids and token; return the rows changed."""
        sql, template, id_slots, token_slot = self._compile(len(ids))
        params = list(template)
        for slot, position in id_slots.items():
            params[slot] = ids[position]
        if token_slot >= 0:
            params[token_slot] = token
        with connections[self.using].cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.rowcount

    def _compile(self, count: int) -> tuple[str, list[Any], dict[int, int], int]:
        if count not in self._compiled:
            sentinels = [-(index + 1) for index in range(count)]
            queryset, values = self.build(sentinels, _TOKEN_SENTINEL)
            query = queryset.query.chain(UpdateQuery)
            query.add_update_values(values)  # type: ignore[attr-defined]
            sql, params = query.get_compiler(using=self.using).as_sql()
            params = list(params)
            id_slots = {
                slot: -value - 1
                for slot, value in enumerate(params)
                if type(value) is int and -count <= value < 0
            }
            token_slots = [
                slot for slot, value in enumerate(params) if value == _TOKEN_SENTINEL
            ]
            if len(id_slots) != count or len(token_slots) > 1:
                raise RuntimeError(f"cannot prepare {sql!r} for re-use")
            self._compiled[count] = (sql, params, id_slots, next(iter(token_slots), -1))
        return self._compiled[count]
