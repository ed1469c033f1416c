from django.apps import AppConfig


class OutboxTestAppConfig(AppConfig):
    """Models and handlers that the outbox's own tests use."""

    name = "tests.outbox_app"
    label = "outbox_testapp"
    default_auto_field = "django.db.models.BigAutoField"
