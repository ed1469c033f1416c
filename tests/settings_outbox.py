"""Minimal settings for the outbox app's own tests, with nothing of the project.

Used to prove the app stands alone, and by the Django 5.2 run in .ci/run.
"""

import os

import dj_database_url

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["OPTIONS"] = {"transaction_mode": "IMMEDIATE", "timeout": 20}
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "outbox",
    "tests.outbox_app",
]
SECRET_KEY = "tests-only-not-a-secret"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
