"""Create the "Outbox operators" group: view, retry and discard outbox events.

Permissions are normally created after the last migration (post_migrate); they
are created here first so the group can hold them on a fresh database.
"""

from django.contrib.auth.management import create_permissions
from django.db import migrations

GROUP = "Outbox operators"
CODENAMES = (
    "view_outboxevent",
    "retry_outboxevent",
    "discard_outboxevent",
    "view_outboxworker",
)


def create_group(apps, schema_editor):
    app_config = apps.get_app_config("outbox")
    app_config.models_module = True
    create_permissions(
        app_config, apps=apps, verbosity=0, using=schema_editor.connection.alias
    )
    app_config.models_module = None
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    db = schema_editor.connection.alias
    group, _ = Group.objects.using(db).get_or_create(name=GROUP)
    group.permissions.add(
        *Permission.objects.using(db).filter(
            content_type__app_label="outbox", codename__in=CODENAMES
        )
    )


def delete_group(apps, schema_editor):
    Group = apps.get_model("auth", "Group")
    Group.objects.using(schema_editor.connection.alias).filter(name=GROUP).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("outbox", "0006_operator_console"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(create_group, delete_group)]
