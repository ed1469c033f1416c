"""When a failed event failed, the clock OUTBOX_PRUNE_FAILED_AFTER_DAYS reads.

Nullable with no default, so adding it rewrites nothing and holds the
table's lock for a moment only. Events that failed before it have none and
are aged by created_at, as pruning did before (outbox/pruning.py).
"""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("outbox", "0008_created_at_brin"),
    ]

    operations = [
        migrations.AddField(
            model_name="outboxevent",
            name="failed_at",
            field=models.DateTimeField(
                blank=True,
                help_text="When the event last ended failed: its last attempt, or "
                "an operator's discard.",
                null=True,
            ),
        ),
    ]
