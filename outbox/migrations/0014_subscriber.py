"""Fan-out: one row per subscriber of an event (a delivery), named in subscriber.

With it, two partial indexes for the operator's console, each holding only
rows an operator looks for: the dead letters (failed, not discarded, by
type, subscriber and cause, covering the dates the page shows) and the
retrying heads of keys.

An event's deliveries share its UUID and idempotency key, so both become
unique per subscriber; a key's order holds per subscriber (its lane), so
the index of unfinished keyed events leads with (key, subscriber). Existing
rows are the unnamed handler's deliveries: subscriber "".

The column is added with a constant default (no row rewritten). On
PostgreSQL the new indexes are built CONCURRENTLY, outside a transaction,
each before the one it replaces is dropped, so publish() never waits for a
build and uniqueness never lapses; a build interrupted earlier leaves an
invalid index, dropped and built again here.
"""

import uuid

from django.db import migrations, models

TABLE = "outbox_outboxevent"
UNFINISHED = models.Q(status__in=["pending", "processing"]) & ~models.Q(key="")

DELIVERY_UNIQUE = models.UniqueConstraint(
    fields=("uuid", "subscriber"), name="outbox_delivery_unique"
)
IDEMPOTENCY_UNIQUE = models.UniqueConstraint(
    fields=("idempotency_key", "subscriber"),
    condition=models.Q(idempotency_key__isnull=False),
    name="outbox_delivery_idempotency_unique",
)
OLD_IDEMPOTENCY_UNIQUE = models.UniqueConstraint(
    fields=("idempotency_key",),
    condition=models.Q(idempotency_key__isnull=False),
    name="outbox_idempotency_key_unique",
)
DEAD_LETTER_INDEX = models.Index(
    fields=("event_type", "subscriber", "error_cause", "failed_at", "created_at"),
    condition=models.Q(status="failed", discarded_at__isnull=True),
    name="outbox_dead_letter_idx",
)
RETRYING_HEAD_INDEX = models.Index(
    fields=("id",),
    condition=models.Q(status="pending", waiting=False)
    & ~models.Q(key="")
    & ~models.Q(last_error=""),
    name="outbox_retrying_head_idx",
)
LANE_INDEX = models.Index(
    fields=("key", "subscriber", "id"),
    condition=UNFINISHED,
    name="outbox_lane_unfinished_idx",
)
OLD_KEY_INDEX = models.Index(
    fields=("key", "id"), condition=UNFINISHED, name="outbox_key_unfinished_idx"
)
NEW_INDEXES = (LANE_INDEX, DEAD_LETTER_INDEX, RETRYING_HEAD_INDEX)
#: The unique indexes behind the two constraints, as PostgreSQL builds them.
UNIQUE_INDEXES = (
    ("outbox_delivery_unique", '("uuid", "subscriber")'),
    (
        "outbox_delivery_idempotency_unique",
        '("idempotency_key", "subscriber") WHERE "idempotency_key" IS NOT NULL',
    ),
)


def build_indexes(apps, schema_editor):
    model = apps.get_model("outbox", "OutboxEvent")
    if schema_editor.connection.vendor != "postgresql":
        schema_editor.add_constraint(model, DELIVERY_UNIQUE)
        schema_editor.add_constraint(model, IDEMPOTENCY_UNIQUE)
        schema_editor.remove_constraint(model, OLD_IDEMPOTENCY_UNIQUE)
        for index in NEW_INDEXES:
            schema_editor.add_index(model, index)
        schema_editor.remove_index(model, OLD_KEY_INDEX)
        return
    for name, definition in UNIQUE_INDEXES:
        if _needs_build(schema_editor, name):
            schema_editor.execute(
                f'CREATE UNIQUE INDEX CONCURRENTLY "{name}" ON "{TABLE}" {definition}'
            )
    for index in NEW_INDEXES:
        if _needs_build(schema_editor, index.name):
            schema_editor.add_index(model, index, concurrently=True)
    schema_editor.execute(
        f'ALTER TABLE "{TABLE}" ADD CONSTRAINT "outbox_delivery_unique" '
        'UNIQUE USING INDEX "outbox_delivery_unique"'
    )
    schema_editor.execute(
        'DROP INDEX CONCURRENTLY IF EXISTS "outbox_idempotency_key_unique"'
    )
    schema_editor.execute(
        'DROP INDEX CONCURRENTLY IF EXISTS "outbox_key_unfinished_idx"'
    )


def _needs_build(schema_editor, name):
    """Whether the index is missing; an invalid one (an interrupted build) is dropped."""
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)",
            [name],
        )
        found = cursor.fetchone()
    if found is not None and not found[0]:
        schema_editor.execute(f'DROP INDEX CONCURRENTLY "{name}"')
    return found is None or not found[0]


def drop_indexes(apps, schema_editor):
    model = apps.get_model("outbox", "OutboxEvent")
    schema_editor.add_index(model, OLD_KEY_INDEX)
    for index in NEW_INDEXES:
        schema_editor.remove_index(model, index)
    schema_editor.add_constraint(model, OLD_IDEMPOTENCY_UNIQUE)
    schema_editor.remove_constraint(model, IDEMPOTENCY_UNIQUE)
    schema_editor.remove_constraint(model, DELIVERY_UNIQUE)


class Migration(migrations.Migration):
    atomic = False

    dependencies = [("outbox", "0013_error_causes")]

    operations = [
        migrations.AddField(
            model_name="outboxevent",
            name="subscriber",
            field=models.CharField(
                blank=True,
                db_default="",
                default="",
                help_text="The named handler (or relay) this row delivers the event "
                "to; empty for the event type's unnamed handler.",
                max_length=100,
            ),
        ),
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AddConstraint(
                    model_name="outboxevent", constraint=DELIVERY_UNIQUE
                ),
                migrations.AddConstraint(
                    model_name="outboxevent", constraint=IDEMPOTENCY_UNIQUE
                ),
                migrations.RemoveConstraint(
                    model_name="outboxevent", name=OLD_IDEMPOTENCY_UNIQUE.name
                ),
                migrations.AddIndex(model_name="outboxevent", index=LANE_INDEX),
                migrations.RemoveIndex(
                    model_name="outboxevent", name=OLD_KEY_INDEX.name
                ),
                migrations.AddIndex(model_name="outboxevent", index=DEAD_LETTER_INDEX),
                migrations.AddIndex(
                    model_name="outboxevent", index=RETRYING_HEAD_INDEX
                ),
            ],
            database_operations=[migrations.RunPython(build_indexes, drop_indexes)],
        ),
        # Dropping the UUID's own unique constraint is quick; the new one,
        # (uuid, subscriber), holds from here.
        migrations.AlterField(
            model_name="outboxevent",
            name="uuid",
            field=models.UUIDField(default=uuid.uuid4, editable=False),
        ),
    ]
