"""Minimal settings for the outbox app's own tests, with nothing of the project.

Used to prove the app stands alone, and by the Django 5.2 run in .ci/run. The
admin and what it needs are here for the operator's console (outbox/admin.py).
"""

import os
from typing import Any

import dj_database_url
import django

from outbox.conf import POSITIVE_INTEGERS

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"),
        # As config/env.py: a worker keeps its connections across batches.
        conn_max_age=60,
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["OPTIONS"] = {"transaction_mode": "IMMEDIATE", "timeout": 20}
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "outbox",
    "tests.outbox_app",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "tests.outbox_app.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
SECRET_KEY = "tests-only-not-a-secret"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# The worker tests' subprocesses take their timings from OUTBOX_* variables,
# read here as config/settings.py reads them for the project: the settings'
# own names only, so an unrelated OUTBOX_* variable is no unknown setting.
OUTBOX: dict[str, Any] = {
    name: os.environ[f"OUTBOX_{name}"]
    for name in (*POSITIVE_INTEGERS, "WORKER_ID")
    if os.environ.get(f"OUTBOX_{name}", "").strip()
}
OUTBOX["LISTEN"] = os.environ.get("OUTBOX_LISTEN", "1") != "0"

# django.tasks exists from Django 6.0; on 5.2 the task backend is not used
# (make test-compat leaves tests/outbox/test_tasks.py out).
if django.VERSION >= (6, 0):
    TASKS = {
        "default": {
            "BACKEND": "outbox.tasks.OutboxTaskBackend",
            "QUEUES": ["default", "reports"],
        }
    }
