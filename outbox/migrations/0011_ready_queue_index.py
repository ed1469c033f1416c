"""The claim of a worker started with --queue: the ready events of a queue.

Built CONCURRENTLY on PostgreSQL, outside a transaction: a plain CREATE
INDEX reads the whole table (completed events included) while every
publish() waits. Partial, on the ready events only, so it stays small.
"""

from django.db import migrations, models

INDEX = models.Index(
    fields=("queue_name", "available_at", "id"),
    condition=models.Q(status="pending", waiting=False),
    name="outbox_ready_queue_idx",
)


def create_index(apps, schema_editor):
    model = apps.get_model("outbox", "OutboxEvent")
    if schema_editor.connection.vendor != "postgresql":
        schema_editor.add_index(model, INDEX)
        return
    # A concurrent build that was interrupted leaves an invalid index of
    # that name behind: drop it, so running the migration again works.
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(
            "SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)",
            [INDEX.name],
        )
        found = cursor.fetchone()
    if found is not None and found[0]:
        schema_editor.remove_index(model, INDEX, concurrently=True)
    elif found is not None:
        return  # built already
    schema_editor.add_index(model, INDEX, concurrently=True)


def drop_index(apps, schema_editor):
    model = apps.get_model("outbox", "OutboxEvent")
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.remove_index(model, INDEX, concurrently=True)
    else:
        schema_editor.remove_index(model, INDEX)


class Migration(migrations.Migration):
    atomic = False

    dependencies = [("outbox", "0010_tasks")]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AddIndex(model_name="outboxevent", index=INDEX)
            ],
            database_operations=[migrations.RunPython(create_index, drop_index)],
        )
    ]
