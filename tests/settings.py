"""Settings for the test suite: the project's settings with test defaults.

The suite runs against PostgreSQL unless DATABASE_URL says otherwise; the
test database name is made unique per run in tests/conftest.py.
"""

import os

os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
os.environ.setdefault("DJANGO_SECRET_KEY", "tests-only-not-a-secret-" + "x" * 40)
os.environ.setdefault("DJANGO_ALLOWED_HOSTS", "testserver,localhost,127.0.0.1")

from config.settings import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
SECURE_SSL_REDIRECT = False

INSTALLED_APPS = [*INSTALLED_APPS, "tests.outbox_app", "benchmarks"]  # noqa: F405

# The outbox's task tests (tests/outbox_app/tasks.py) use a second queue.
TASKS = {
    "default": {
        "BACKEND": "outbox.tasks.OutboxTaskBackend",
        "QUEUES": ["default", "reports"],
    }
}
