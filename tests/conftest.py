import os
import secrets
from typing import Any

import pytest
from django.conf import settings

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

    registered: list[str] = []

    def register(event_type: str, function=None, *, max_attempts=None):
        def decorate(function):
            registry.handler(event_type, max_attempts=max_attempts)(function)
            registered.append(event_type)
            return function

        return decorate(function) if function is not None else decorate

    yield register
    for event_type in registered:
        registry.unregister(event_type)


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
