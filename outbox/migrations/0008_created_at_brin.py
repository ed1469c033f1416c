"""A BRIN index on created_at, for the admin's created-date filter (PostgreSQL).

A B-tree on created_at would take a new entry on every claim and every
completion (each writes a new row version). A BRIN index stores one summary
per range of table pages: rows arrive in created_at order, so a date range
maps to a few page ranges, and new rows at the table's end cost nothing until
their range is summarised by VACUUM.
"""

from django.db import migrations


def create_index(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(
            "CREATE INDEX outbox_created_brin ON outbox_outboxevent "
            "USING brin (created_at)"
        )


def drop_index(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("DROP INDEX IF EXISTS outbox_created_brin")


class Migration(migrations.Migration):
    dependencies = [("outbox", "0007_outbox_operators_group")]

    operations = [migrations.RunPython(create_index, drop_index)]
