"""Settings for benchmarks/run.py: the outbox app alone, on PostgreSQL."""

import os

import dj_database_url

DATABASES = {
    "default": dj_database_url.parse(os.environ["DATABASE_URL"], conn_max_age=60)
}
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "outbox",
    "benchmarks",
    # The tasks workload's peer (benchmarks/tasks.py).
    "django_tasks_db",
]
SECRET_KEY = "benchmark-only-not-a-secret"  # noqa: S105 - never deployed
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
OUTBOX: dict[str, object] = {}
TASKS = {
    "default": {"BACKEND": "outbox.tasks.OutboxTaskBackend"},
    "db": {"BACKEND": "django_tasks_db.DatabaseBackend"},
}
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {
        "outbox": {"level": "WARNING"},
        "django.tasks": {"level": "WARNING"},
        "django_tasks_db": {"level": "WARNING"},
    },
}

# The drain-1-traced workload's workers: an OpenTelemetry SDK provider.
if os.environ.get("BENCHMARK_TRACING") == "1":
    from benchmarks.tracing import set_provider

    set_provider()

# The relay workload's workers (benchmarks/relays.py): its relays, as JSON.
if os.environ.get("BENCHMARK_RELAYS"):
    import json

    OUTBOX["RELAYS"] = json.loads(os.environ["BENCHMARK_RELAYS"])
