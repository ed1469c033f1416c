"""Wake listening workers from the database itself when events are inserted.

A statement-level trigger runs pg_notify(<table name>, '') inside the
inserting transaction. PostgreSQL delivers notifications only when that
transaction commits, drops them when it (or the savepoint around the insert)
rolls back, and sends one per channel per transaction however many rows and
statements it inserted. No extra round trip for publishers, nothing sent for
nothing, and events inserted by any means wake the workers.
"""

from django.db import migrations

CREATE = """
CREATE FUNCTION outbox_notify_workers() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_TABLE_NAME, '');
    RETURN NULL;
END
$$;
CREATE TRIGGER outbox_notify_workers
AFTER INSERT ON outbox_outboxevent
FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify_workers();
"""
DROP = """
DROP TRIGGER IF EXISTS outbox_notify_workers ON outbox_outboxevent;
DROP FUNCTION IF EXISTS outbox_notify_workers();
"""


def create_trigger(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(CREATE)


def drop_trigger(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP)


class Migration(migrations.Migration):
    dependencies = [("outbox", "0004_idempotency_key_partial_unique")]

    operations = [migrations.RunPython(create_trigger, drop_trigger)]
