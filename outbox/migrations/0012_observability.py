"""Observability: each failure's cause, the publisher's trace, a minute's work.

- error_cause: the admin's dead letters group failed events by it
  (outbox/causes.py). Events that fail from now on get it with the
  failure; 0013 gives the failed and retrying events already there theirs.
- trace_context: the W3C trace context publish() saw (outbox/tracing.py).
- OutboxActivity: what the workers recorded per minute, for the admin's
  chart of the last hour (outbox/activity.py).

A constant default (kept in the database, for the INSERTs that name no
error_cause) and a nullable column: adding them rewrites no row.
"""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("outbox", "0011_ready_queue_index"),
    ]

    operations = [
        migrations.CreateModel(
            name="OutboxActivity",
            fields=[
                ("minute", models.DateTimeField(primary_key=True, serialize=False)),
                ("completed", models.PositiveBigIntegerField(default=0)),
                ("failed", models.PositiveBigIntegerField(default=0)),
                ("ready", models.PositiveIntegerField(blank=True, null=True)),
            ],
            options={
                "verbose_name": "outbox activity",
                "verbose_name_plural": "outbox activity",
                "ordering": ("minute",),
            },
        ),
        migrations.AddField(
            model_name="outboxevent",
            name="error_cause",
            field=models.CharField(
                blank=True,
                db_default="",
                default="",
                help_text="The last error's class and first line, with numbers, "
                "ids and quoted values stripped.",
                max_length=300,
            ),
        ),
        migrations.AddField(
            model_name="outboxevent",
            name="trace_context",
            field=models.JSONField(blank=True, editable=False, null=True),
        ),
    ]
