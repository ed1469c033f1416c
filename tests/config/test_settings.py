"""Settings come from the environment and fail with the variable's name.

Settings are read once per process, so each case imports them in a fresh
interpreter with its own environment.
"""

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from config import env

ROOT = Path(__file__).resolve().parents[2]
SMTP = "django.core.mail.backends.smtp.EmailBackend"
SECRET = "k3y-" + "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJ"


def run_python(code: str, **variables: str) -> subprocess.CompletedProcess[str]:
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("DJANGO_", "DATABASE_URL"))
    }
    environment.update(variables)
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def load_settings(**variables: str) -> subprocess.CompletedProcess[str]:
    return run_python(
        "import json, config.settings as s;"
        "print(json.dumps({'debug': s.DEBUG, 'db': s.DATABASES['default'],"
        " 'hosts': s.ALLOWED_HOSTS, 'mail': s.MAILERS['default'],"
        " 'level': s.LOG_LEVEL}, default=str))",
        **variables,
    )


def manage(*arguments: str, **variables: str) -> subprocess.CompletedProcess[str]:
    return run_python(
        "import sys; from django.core.management import execute_from_command_line;"
        f"execute_from_command_line(['manage.py', *{list(arguments)!r}])",
        DJANGO_SETTINGS_MODULE="config.settings",
        **variables,
    )


def test_defaults__debug_off_requires_the_secret_key() -> None:
    result = load_settings()

    assert result.returncode != 0
    assert "ImproperlyConfigured: DJANGO_SECRET_KEY is required" in result.stderr


def test_debug__defaults_to_sqlite_with_immediate_transactions() -> None:
    result = load_settings(DJANGO_DEBUG="1")

    assert result.returncode == 0, result.stderr
    assert '"ENGINE": "django.db.backends.sqlite3"' in result.stdout
    assert '"transaction_mode": "IMMEDIATE"' in result.stdout
    assert str(ROOT / "db.sqlite3") in result.stdout
    assert "console.EmailBackend" in result.stdout


def test_production__uses_smtp_and_the_given_hosts() -> None:
    result = load_settings(
        DJANGO_SECRET_KEY=SECRET,
        DJANGO_ALLOWED_HOSTS="example.com, www.example.com",
        DJANGO_EMAIL_PORT="587",
        DATABASE_URL="postgres://app:pw@db.internal:5432/app",
    )

    assert result.returncode == 0, result.stderr
    assert '"hosts": ["example.com", "www.example.com"]' in result.stdout
    assert "smtp.EmailBackend" in result.stdout
    assert '"port": 587' in result.stdout
    assert '"use_tls": false' in result.stdout
    assert '"ENGINE": "django.db.backends.postgresql"' in result.stdout


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"DATABASE_URL": "nonsense://x"}, "DATABASE_URL='nonsense://x' is not"),
        ({"DATABASE_URL": "mysql://u@h/db"}, "DATABASE_URL selects"),
        ({"DATABASE_URL": "postgres://u:hunter2@h:5432"}, "names no database"),
        ({"DJANGO_DEBUG": "maybe"}, "DJANGO_DEBUG='maybe' is not a boolean"),
        ({"DJANGO_EMAIL_BACKEND": SMTP, "DJANGO_EMAIL_PORT": "x"}, "not an integer"),
        (
            {"DJANGO_EMAIL_BACKEND": SMTP, "DJANGO_EMAIL_PORT": "0"},
            "PORT=0 is too small",
        ),
        ({"DJANGO_LOG_LEVEL": "LOUD"}, "DJANGO_LOG_LEVEL='LOUD' is not valid"),
    ],
)
def test_malformed_values__name_the_variable(variables, message) -> None:
    result = load_settings(**{"DJANGO_DEBUG": "1", **variables})

    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert message in result.stderr
    assert "hunter2" not in result.stderr


def test_short_secret_key__is_refused() -> None:
    result = load_settings(DJANGO_SECRET_KEY="short")

    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY is too short: 5 characters" in result.stderr


def test_development_secret_key__is_refused_outside_debug() -> None:
    result = load_settings(
        DJANGO_SECRET_KEY="django-insecure-local-development-only" + "x" * 20
    )

    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY starts with 'django-insecure-'" in result.stderr


@pytest.mark.parametrize("length", [38, 49])
def test_env_secret_key__refuses_fewer_than_50_characters(monkeypatch, length) -> None:
    monkeypatch.setenv("SOME_SECRET", "k" * length)

    with pytest.raises(ImproperlyConfigured) as raised:
        env.env_secret_key("SOME_SECRET")

    assert (
        f"SOME_SECRET is too short: {length} characters, expected at least 50"
        in str(raised.value)
    )


def test_env_secret_key__refuses_the_insecure_prefix(monkeypatch) -> None:
    monkeypatch.setenv("SOME_SECRET", "django-insecure-" + "k" * 50)

    with pytest.raises(ImproperlyConfigured, match="starts with 'django-insecure-'"):
        env.env_secret_key("SOME_SECRET")


def test_env_secret_key__accepts_50_random_characters(monkeypatch) -> None:
    key = secrets.token_urlsafe(50)[:50]
    monkeypatch.setenv("SOME_SECRET", key)

    assert env.env_secret_key("SOME_SECRET") == key


def test_hsts__defaults_to_a_year_with_subdomains_and_preload() -> None:
    result = run_python(
        "import config.settings as s;"
        "print(s.SECURE_HSTS_SECONDS, s.SECURE_HSTS_INCLUDE_SUBDOMAINS,"
        " s.SECURE_HSTS_PRELOAD)",
        DJANGO_SECRET_KEY=SECRET,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["31536000", "True", "True"]


def test_hsts__opts_out_with_zero_seconds() -> None:
    result = run_python(
        "import config.settings as s; print(s.SECURE_HSTS_SECONDS)",
        DJANGO_SECRET_KEY=SECRET,
        DJANGO_SECURE_HSTS_SECONDS="0",
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0"]


def production(**variables: str) -> dict[str, str]:
    """Return the environment of a production deployment: the README's minimum."""
    return {
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
        "DJANGO_ALLOWED_HOSTS": "example.com",
        "DJANGO_SITE_URL": "https://example.com",
        **variables,
    }


def test_check_deploy__passes_at_warning_level_in_production() -> None:
    result = manage("check", "--deploy", "--fail-level", "WARNING", **production())

    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout


def test_check_deploy__refuses_a_site_url_without_https() -> None:
    result = manage(
        "check", "--deploy", **production(DJANGO_SITE_URL="http://example.com")
    )

    assert result.returncode != 0
    assert "config.E001" in result.stderr
    assert "DJANGO_SITE_URL" in result.stderr


def test_check__fails_naming_database_url() -> None:
    result = manage("check", DATABASE_URL="nonsense://x")

    assert result.returncode != 0
    assert "DATABASE_URL" in result.stderr


def test_env_int__accepts_a_blank_as_the_default(monkeypatch) -> None:
    monkeypatch.setenv("SOME_NUMBER", " ")

    assert env.env_int("SOME_NUMBER", 5) == 5


def test_env_required__names_the_variable(monkeypatch) -> None:
    monkeypatch.delenv("SOME_REQUIRED", raising=False)

    with pytest.raises(ImproperlyConfigured, match="SOME_REQUIRED is required"):
        env.env_required("SOME_REQUIRED", "a value")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("YES", True), ("on", True), ("0", False), ("", False), (None, True)],
)
def test_env_bool__reads_common_spellings(monkeypatch, raw, expected) -> None:
    if raw is None:
        monkeypatch.delenv("SOME_FLAG", raising=False)
    else:
        monkeypatch.setenv("SOME_FLAG", raw)

    assert env.env_bool("SOME_FLAG", True) is expected


def test_env_list__drops_blanks(monkeypatch) -> None:
    monkeypatch.setenv("SOME_LIST", "a, ,b,")

    assert env.env_list("SOME_LIST", ["x"]) == ["a", "b"]


def test_database_error__hides_the_password() -> None:
    with pytest.raises(ImproperlyConfigured) as raised:
        os.environ["BROKEN_URL"] = "postgres://app:hunter2@db:5432"
        try:
            env.env_database("BROKEN_URL", "sqlite:///x")
        finally:
            del os.environ["BROKEN_URL"]

    assert "hunter2" not in str(raised.value)
    assert "app:***@db:5432" in str(raised.value)


def test_relays__come_from_the_environment_and_pass_the_checks() -> None:
    relays = run_python(
        "import json, config.settings as s; print(json.dumps(s.OUTBOX.get('RELAYS')))",
        DJANGO_DEBUG="1",
        OUTBOX_RELAY_NATS_SERVERS="nats://127.0.0.1:4222,nats://127.0.0.1:4223",
        OUTBOX_RELAY_NATS_EVENT_TYPES="user.*, project.created",
        OUTBOX_RELAY_AMQP_URL="amqp://guest:guest@127.0.0.1:5672/%2F",
    )
    checked = manage(
        "check",
        DJANGO_DEBUG="1",
        OUTBOX_RELAY_NATS_SERVERS="nats://127.0.0.1:4222",
        OUTBOX_RELAY_AMQP_URL="amqp://guest:guest@127.0.0.1:5672/%2F",
    )
    off = run_python(
        "import config.settings as s; print('RELAYS' in s.OUTBOX)", DJANGO_DEBUG="1"
    )

    assert relays.returncode == 0, relays.stderr
    assert json.loads(relays.stdout) == {
        "bus": {
            "BACKEND": "outbox.relays.NatsRelay",
            "EVENT_TYPES": ["user.*", "project.created"],
            "OPTIONS": {
                "servers": ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223"],
                "subject": "events.{event_type}",
            },
        },
        "amqp": {
            "BACKEND": "outbox.relays.RabbitMQRelay",
            "EVENT_TYPES": ["*"],
            "OPTIONS": {
                "url": "amqp://guest:guest@127.0.0.1:5672/%2F",
                "exchange": "events",
                "routing_key": "{event_type}",
            },
        },
    }
    assert checked.returncode == 0, checked.stderr
    assert off.stdout.strip() == "False"
