from django.apps import AppConfig


class BenchmarksConfig(AppConfig):
    """The no-op handler the benchmark drains."""

    name = "benchmarks"
    default_auto_field = "django.db.models.BigAutoField"
