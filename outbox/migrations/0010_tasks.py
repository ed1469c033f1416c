"""Queues, the claim's timestamps and a task's result (outbox.tasks).

queue_name has a database default, so adding it rewrites no row (PostgreSQL
11 and later keep a constant default in the catalogue) and raw INSERTs that
name no queue still work. Its index comes in 0011, built without blocking
writes.
"""

import django.core.serializers.json
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("outbox", "0009_failed_at"),
    ]

    operations = [
        migrations.AddField(
            model_name="outboxevent",
            name="last_attempted_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="outboxevent",
            name="queue_name",
            field=models.CharField(
                db_default="default", default="default", max_length=200
            ),
        ),
        migrations.AddField(
            model_name="outboxevent",
            name="result",
            field=models.JSONField(
                blank=True,
                encoder=django.core.serializers.json.DjangoJSONEncoder,
                null=True,
            ),
        ),
        migrations.AddField(
            model_name="outboxevent",
            name="started_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AlterField(
            model_name="outboxevent",
            name="history",
            field=models.JSONField(
                blank=True,
                default=list,
                encoder=django.core.serializers.json.DjangoJSONEncoder,
                help_text="One entry per failed attempt (when, worker, error class, message and traceback) or operator action (when, who, what). Never the payload.",
            ),
        ),
    ]
