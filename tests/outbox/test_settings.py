import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import override_settings

from outbox.checks import check_outbox_settings
from outbox.conf import get_settings

ROOT = Path(__file__).resolve().parents[2]


def test_defaults__match_the_documented_values() -> None:
    with override_settings(OUTBOX={}):
        values = get_settings()

    assert (values.poll_ms, values.batch_size, values.stuck_timeout_ms) == (
        2000,
        32,
        60_000,
    )
    assert (values.max_attempts, values.backoff_base_ms, values.backoff_cap_ms) == (
        10,
        1000,
        60_000,
    )
    assert values.listen is True
    assert values.default_worker_id.rsplit("-", 1)[1].isdigit()


def test_strings_from_the_environment__are_accepted() -> None:
    with override_settings(OUTBOX={"POLL_MS": "250", "WORKER_ID": "w-1"}):
        values = get_settings()

    assert values.poll_ms == 250
    assert values.default_worker_id == "w-1"


@pytest.mark.parametrize(
    "value", ["abc", "0", "-5", "1.5", "²", 0, -1, 2.5, True, None, ""]
)
def test_check__rejects_what_is_not_a_positive_integer(value) -> None:
    with override_settings(OUTBOX={"BATCH_SIZE": value}):
        [error] = check_outbox_settings()

    assert error.id == "outbox.E002"
    assert "OUTBOX['BATCH_SIZE']" in error.msg
    assert "OUTBOX_BATCH_SIZE" in error.msg


@pytest.mark.parametrize(
    ("outbox", "message"),
    [
        ({"POLL": 5}, "['POLL'] is not a known setting"),
        ({"WORKER_ID": 5}, "must be a string"),
        ({"LISTEN": "yes"}, "True or False"),
    ],
)
def test_check__rejects_other_mistakes(outbox, message) -> None:
    with override_settings(OUTBOX=outbox):
        messages = [error.msg for error in check_outbox_settings()]

    assert any(message in text for text in messages), messages


def test_check__rejects_a_non_dict() -> None:
    with override_settings(OUTBOX=[("POLL_MS", 5)]):
        [error] = check_outbox_settings()

    assert error.id == "outbox.E001"


def test_get_settings__raises_naming_the_setting() -> None:
    with (
        override_settings(OUTBOX={"STUCK_TIMEOUT_MS": "soon"}),
        pytest.raises(ImproperlyConfigured, match="OUTBOX_STUCK_TIMEOUT_MS"),
    ):
        get_settings()


def test_manage_py_check__fails_naming_the_variable() -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "DJANGO_DEBUG": "1",
            "OUTBOX_POLL_MS": "-3",
            # The suite's own: the outbox-only ones under Django 5.2, where the
            # project (which needs Django 6.1) does not load.
            "DJANGO_SETTINGS_MODULE": settings.SETTINGS_MODULE,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode != 0
    assert "outbox.E002" in result.stderr
    assert "OUTBOX_POLL_MS" in result.stderr


def test_concurrency__defaults_to_one() -> None:
    with override_settings(OUTBOX={}):
        assert get_settings().concurrency == 1


def test_check__rejects_a_concurrency_that_is_not_a_positive_integer() -> None:
    with override_settings(OUTBOX={"CONCURRENCY": "0"}):
        [error] = check_outbox_settings()

    assert "OUTBOX['CONCURRENCY']" in error.msg
    assert "OUTBOX_CONCURRENCY" in error.msg


@pytest.mark.sqlite
def test_check__refuses_concurrency_above_one_on_sqlite_only() -> None:
    """Both suites run this: SQLite refuses, PostgreSQL accepts."""
    with override_settings(OUTBOX={"CONCURRENCY": "4"}):
        errors = check_outbox_settings()

    if connection.vendor == "sqlite":
        [error] = errors
        assert error.id == "outbox.E003"
        assert "OUTBOX['CONCURRENCY']" in error.msg
        assert "OUTBOX_CONCURRENCY" in error.msg
    else:
        assert errors == []


@pytest.mark.sqlite
def test_command__refuses_concurrency_above_one_on_sqlite(monkeypatch) -> None:
    """The command checks the database it will run on, whatever the settings say."""
    monkeypatch.setattr(connection, "vendor", "sqlite")

    with pytest.raises(CommandError, match="--concurrency 2 needs PostgreSQL"):
        call_command("run_outbox_worker", "--concurrency", "2", "--drain")


@pytest.mark.parametrize("name", ["MAX_PAYLOAD_BYTES", "PRUNE_FAILED_AFTER_DAYS"])
def test_check__rejects_a_bad_limit_naming_the_variable(name) -> None:
    with override_settings(OUTBOX={name: "lots"}):
        [error] = check_outbox_settings()

    assert f"OUTBOX['{name}']" in error.msg
    assert f"OUTBOX_{name}" in error.msg


def test_limits__default_to_a_mebibyte_of_payload_and_keeping_failed_events() -> None:
    with override_settings(OUTBOX={}):
        values = get_settings()

    assert (values.max_payload_bytes, values.prune_failed_after_days) == (
        1_048_576,
        None,
    )


@pytest.mark.parametrize(
    ("worker_id", "message"),
    [
        ("w" * 201, "is 201 characters long; the limit is 200"),
        ("w\x00", r"contains a NUL character \(U\+0000\)"),
    ],
    ids=["too-long", "nul"],
)
def test_check__rejects_a_worker_id_its_columns_cannot_hold(worker_id, message) -> None:
    with override_settings(OUTBOX={"WORKER_ID": worker_id}):
        [error] = check_outbox_settings()

    assert re.search(r"settings\.OUTBOX\['WORKER_ID'\] " + message, error.msg)
    assert "OUTBOX_WORKER_ID" in error.msg


def test_worker__refuses_a_worker_id_its_columns_cannot_hold() -> None:
    """drain() and code that builds a Worker get the command's check."""
    from outbox.worker import Worker

    with pytest.raises(ValueError, match="worker_id is 201 characters long"):
        Worker(worker_id="w" * 201)


@pytest.mark.sqlite
@pytest.mark.parametrize(
    ("worker_id", "message"),
    [
        ("w" * 201, "--worker-id is 201 characters long; the limit is 200."),
        ("w\x00", "--worker-id contains a NUL character (U+0000)"),
    ],
    ids=["too-long", "nul"],
)
def test_command__refuses_a_worker_id_its_columns_cannot_hold(
    worker_id, message, monkeypatch
) -> None:
    """Refused at start: on PostgreSQL every claim would fail writing it, turn
    after turn, and the worker would never drain."""
    started: list[object] = []
    monkeypatch.setattr("outbox.runner.Runner.run", lambda runner: started.append(1))

    with pytest.raises(CommandError, match=re.escape(message)):
        call_command("run_outbox_worker", "--worker-id", worker_id, "--drain")

    assert started == []
