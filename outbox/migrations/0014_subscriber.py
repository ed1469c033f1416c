"""Fan-out: one row per subscriber of an event (a delivery), named in subscriber.

Existing rows are the unnamed handler's deliveries: subscriber "". The column
is added with a constant default kept in the database, so no row is
rewritten and INSERTs that name no subscriber still work; 0015 builds the
indexes that make UUID and idempotency key unique per subscriber.
"""

from django.db import migrations, models


class Migration(migrations.Migration):
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
    ]
