"""Fan-out's indexes: one row per subscriber of an event (0014's column).

An event's deliveries share its UUID and idempotency key, so both become
unique per subscriber; a key's order holds per subscriber (its lane), so
the index of unfinished keyed events leads with (key, subscriber). With
them, two partial indexes for the operator's console, each holding only rows
an operator looks for: the dead letters (failed, not discarded, by type,
subscriber and cause, with the dates the page shows) and the retrying heads
of keys.

On PostgreSQL each index is built CONCURRENTLY, outside a transaction,
before the one it replaces is dropped, so publish() never waits for a build
and uniqueness never lapses. Every step can run again: a build interrupted
earlier leaves an invalid index, dropped and built again here; a constraint
already made is left as it is.

Going back is refused once named deliveries exist: they would break the
UUID's uniqueness, and which to keep is the operator's choice.
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
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(
            "SELECT 1 FROM pg_constraint WHERE conname = 'outbox_delivery_unique'"
        )
        constrained = cursor.fetchone() is not None
    if not constrained:
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


def drop_uuid_unique(apps, schema_editor):
    model = apps.get_model("outbox", "OutboxEvent")
    if schema_editor.connection.vendor != "postgresql":
        old = models.UUIDField(default=uuid.uuid4, editable=False, unique=True)
        old.set_attributes_from_name("uuid")
        new = models.UUIDField(default=uuid.uuid4, editable=False)
        new.set_attributes_from_name("uuid")
        schema_editor.alter_field(model, old, new)
        return
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(
            "SELECT conname FROM pg_constraint WHERE conrelid = %s::regclass"
            " AND contype = 'u' AND conkey = ARRAY[("
            " SELECT attnum FROM pg_attribute WHERE attrelid = %s::regclass"
            " AND attname = 'uuid')]::smallint[]",
            [TABLE, TABLE],
        )
        names = [row[0] for row in cursor.fetchall()]
    for name in names:
        schema_editor.execute(
            f'ALTER TABLE "{TABLE}" DROP CONSTRAINT IF EXISTS "{name}"'
        )


def add_uuid_unique(apps, schema_editor):
    model = apps.get_model("outbox", "OutboxEvent")
    old = models.UUIDField(default=uuid.uuid4, editable=False)
    old.set_attributes_from_name("uuid")
    new = models.UUIDField(default=uuid.uuid4, editable=False, unique=True)
    new.set_attributes_from_name("uuid")
    schema_editor.alter_field(model, old, new)


def drop_indexes(apps, schema_editor):
    model = apps.get_model("outbox", "OutboxEvent")
    if model.objects.exclude(subscriber="").exists():
        raise RuntimeError(
            "Cannot undo outbox 0015: named subscribers' deliveries exist, and an "
            "event's UUID would no longer be unique. Delete or keep them first "
            "(OutboxEvent.objects.exclude(subscriber='')), then migrate back."
        )
    schema_editor.add_index(model, OLD_KEY_INDEX)
    for index in NEW_INDEXES:
        schema_editor.remove_index(model, index)
    schema_editor.add_constraint(model, OLD_IDEMPOTENCY_UNIQUE)
    schema_editor.remove_constraint(model, IDEMPOTENCY_UNIQUE)
    schema_editor.remove_constraint(model, DELIVERY_UNIQUE)


class Migration(migrations.Migration):
    atomic = False

    dependencies = [("outbox", "0014_subscriber")]

    operations = [
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
        # The UUID's own unique constraint goes last: (uuid, subscriber)
        # holds from here. Dropped by name as PostgreSQL reports it, if it is
        # still there, so this step too can run again.
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="outboxevent",
                    name="uuid",
                    field=models.UUIDField(default=uuid.uuid4, editable=False),
                )
            ],
            database_operations=[
                migrations.RunPython(drop_uuid_unique, add_uuid_unique)
            ],
        ),
    ]
