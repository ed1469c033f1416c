"""Read typed values from the environment, failing with the variable's name."""

import os

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
#: Django's deploy check (security.W009) asks for as much, and no such prefix.
SECRET_KEY_MIN_LENGTH = 50
INSECURE_KEY_PREFIX = "django-insecure-"
_MAKE_A_KEY = (
    "Make one with: python -c 'import secrets; print(secrets.token_urlsafe(50))'"
)


def _raw(name: str) -> str | None:
    value = os.environ.get(name)
    return None if value is None else value.strip()


def env_str(name: str, default: str) -> str:
    """Return the variable as a string, or default when it is unset."""
    value = _raw(name)
    return default if value is None else value


def env_required(name: str, expected: str) -> str:
    """Return the variable, raising ImproperlyConfigured when unset or empty."""
    value = _raw(name)
    if not value:
        raise ImproperlyConfigured(f"{name} is required: expected {expected}.")
    return value


def env_secret_key(name: str) -> str:
    """Return the variable as a secret key fit for production.

    The rules are those of Django's own deploy check (security.W009), raised
    to errors: a guessable key forges sessions and invitation links.
    """
    value = env_required(
        name,
        "a long random string when DJANGO_DEBUG is off "
        "(or set DJANGO_DEBUG=1 for local development)",
    )
    if value.startswith(INSECURE_KEY_PREFIX):
        raise ImproperlyConfigured(
            f"{name} starts with {INSECURE_KEY_PREFIX!r}, which marks a development "
            f"key: expected a random string of your own. {_MAKE_A_KEY}"
        )
    if len(value) < SECRET_KEY_MIN_LENGTH:
        raise ImproperlyConfigured(
            f"{name} is too short: {len(value)} characters, expected at least "
            f"{SECRET_KEY_MIN_LENGTH} random characters. {_MAKE_A_KEY}"
        )
    return value


def env_bool(name: str, default: bool) -> bool:
    """Return the variable as a boolean (1/0, true/false, yes/no, on/off)."""
    value = _raw(name)
    if value is None:
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ImproperlyConfigured(
        f"{name}={value!r} is not a boolean: expected one of 1, 0, true, false, "
        "yes, no, on, off."
    )


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    """Return the variable as an integer, at least minimum when one is given."""
    value = _raw(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise ImproperlyConfigured(
            f"{name}={value!r} is not an integer: expected a whole number."
        ) from None
    if minimum is not None and number < minimum:
        raise ImproperlyConfigured(
            f"{name}={number} is too small: expected an integer >= {minimum}."
        )
    return number


def env_list(name: str, default: list[str]) -> list[str]:
    """Return the variable as a comma-separated list with blanks dropped."""
    value = _raw(name)
    if value is None:
        return list(default)
    return [item.strip() for item in value.split(",") if item.strip()]


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    """Return the variable, which must be one of choices (case-insensitive)."""
    value = env_str(name, default).upper()
    if value not in choices:
        raise ImproperlyConfigured(
            f"{name}={value!r} is not valid: expected one of {', '.join(choices)}."
        )
    return value


def env_database(name: str, default: str) -> dict[str, object]:
    """Return a DATABASES entry parsed from a database URL."""
    url = env_str(name, default) or default
    try:
        # Kept open across requests, and by outbox workers across batches and
        # events: with 0, a worker would reconnect for every one of them.
        config: dict[str, object] = dict(
            dj_database_url.parse(
                url,
                conn_max_age=env_int("DJANGO_CONN_MAX_AGE", default=60, minimum=0),
                conn_health_checks=True,
            )
        )
    except ValueError as error:
        raise ImproperlyConfigured(
            f"{name}={_redact(url)!r} is not a database URL this project supports: "
            f"expected sqlite:///path/to/file.sqlite3 or "
            f"postgres://user:password@host:port/name ({error})."
        ) from None
    engine = config.get("ENGINE")
    if engine == "django.db.backends.sqlite3":
        # IMMEDIATE takes the write lock when a transaction starts, so two
        # workers claiming at once queue up instead of failing with
        # "database is locked" halfway through their transactions.
        config["OPTIONS"] = {"transaction_mode": "IMMEDIATE", "timeout": 20}
    elif engine != "django.db.backends.postgresql":
        raise ImproperlyConfigured(
            f"{name} selects {engine}: expected a sqlite:// or postgres:// URL."
        )
    elif not config.get("NAME"):
        raise ImproperlyConfigured(
            f"{name}={_redact(url)!r} names no database: expected "
            "postgres://user:password@host:port/name."
        )
    return config


def _redact(url: str) -> str:
    """Return the URL with any password replaced, so errors never leak it."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else url
