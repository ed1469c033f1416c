"""Give the failed and retrying events already there their error cause.

Outside a transaction, a thousand events per short one, so publish() and
the workers never wait for it, however many failed events the table keeps
(failed events are kept until an operator's retention removes them). An
interrupted run resumes where it stopped: only events without a cause are
read.
"""

from django.db import migrations, transaction

from outbox.causes import cause_of

#: Events given their cause per transaction.
CHUNK = 1000


def backfill_causes(apps, schema_editor):
    alias = schema_editor.connection.alias
    events = apps.get_model("outbox", "OutboxEvent").objects.using(alias)
    table = schema_editor.quote_name(events.model._meta.db_table)
    after = 0
    while True:
        chunk = list(
            events.filter(
                status__in=["failed", "pending"], error_cause="", pk__gt=after
            )
            .exclude(last_error="")
            .order_by("pk")
            .values_list("pk", "last_error")[:CHUNK]
        )
        if not chunk:
            return
        with (
            transaction.atomic(using=alias),
            schema_editor.connection.cursor() as cursor,
        ):
            cursor.executemany(
                f"UPDATE {table} SET error_cause = %s WHERE id = %s",  # noqa: S608 - a name
                [(cause_of(last_error), pk) for pk, last_error in chunk],
            )
        after = chunk[-1][0]


class Migration(migrations.Migration):
    atomic = False

    dependencies = [("outbox", "0012_observability")]

    operations = [
        migrations.RunPython(backfill_causes, migrations.RunPython.noop, elidable=True)
    ]
