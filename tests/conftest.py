import importlib
import os
import secrets
from collections.abc import Callable
from typing import Any

import pytest
from django.apps.registry import Apps
from django.conf import settings
from django.db import connection
from django.db.migrations.loader import MigrationLoader

pytest_plugins = ["outbox.testing"]


@pytest.fixture(scope="session")
def django_db_modify_db_settings() -> None:
    """Give every test run its own database so parallel runs never collide.

    TEST_DATABASE_NAME names a database prepared beforehand instead (the
    mutant check copies one per run; pytest then needs --reuse-db).
    """
    suffix = f"{os.getpid()}_{secrets.token_hex(4)}"
    for database in settings.DATABASES.values():
        if database["ENGINE"] == "django.db.backends.sqlite3":
            continue  # Django tests SQLite in memory, private to the process.
        test: dict[str, Any] = dict(database.get("TEST") or {})  # type: ignore[call-overload]
        test["NAME"] = os.environ.get(
            "TEST_DATABASE_NAME", f"test_{database['NAME']}_{suffix}"
        )
        database["TEST"] = test


@pytest.fixture
def register_handler():
    """Register handlers for one test and forget them afterwards."""
    from outbox import registry

    registered: list[tuple[str, str]] = []

    def register(event_type: str, function=None, *, max_attempts=None, name=None):
        def decorate(function):
            registry.handler(event_type, max_attempts=max_attempts, name=name)(function)
            registered.append((event_type, name or ""))
            return function

        return decorate(function) if function is not None else decorate

    yield register
    for event_type, subscriber in registered:
        registry.unregister(event_type, subscriber)


@pytest.fixture(autouse=True)
def fresh_rate_limits() -> Any:
    """Each test starts with no requests counted against the API's limits
    (the outbox app's own settings, tests/settings_outbox.py, have none)."""
    from django.core.cache import caches

    cache = getattr(settings, "THROTTLE_CACHE", None)
    if cache is not None:
        caches[cache].clear()
    yield
    if cache is not None:
        caches[cache].clear()


GROUP_MIGRATION = ("outbox", "0007_outbox_operators_group")
group_migration = importlib.import_module("outbox.migrations." + GROUP_MIGRATION[1])

# Migration 0007 creates the "Outbox operators" group, but every transactional
# test (django_db(transaction=True)) flushes the database when it ends, and the
# flush's post_migrate brings back content types and permissions, not the
# group. So the tests that need the group run the migration's own function
# again (get_or_create, then add: idempotent), with the historical models the
# migration runs with, instead of hoping to run before any flush. Not
# serialized_rollback: it works only in transactional tests, which would make
# every operator test slow, and its flush skips post_migrate, which leaves the
# transactional tests that follow without permissions: another order dependency.


@pytest.fixture(scope="session")
def migration_apps() -> Apps:
    """Return the historical models that migration 0007 runs with."""
    loader = MigrationLoader(None, ignore_no_migrations=True)
    return loader.project_state(GROUP_MIGRATION, at_end=False).apps


@pytest.fixture
def run_group_migration(migration_apps, db) -> Callable[[], str]:
    """Return a function that runs migration 0007 forwards; it returns the group."""

    def run() -> str:
        group_migration.create_group(migration_apps, connection.schema_editor())
        return group_migration.GROUP

    return run
