"""Settings for the reference project, read from the environment.

Every value has an explicit default, except DJANGO_SECRET_KEY outside debug.
A malformed value raises ImproperlyConfigured naming the variable.
"""

import os
from pathlib import Path
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from config.env import (
    env_bool,
    env_choice,
    env_database,
    env_int,
    env_list,
    env_secret_key,
    env_str,
)

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("DJANGO_DEBUG", default=False)

# Parsed before the secret key so a broken URL is reported even in a shell
# that has no secret yet.
DATABASES = {
    "default": env_database(
        "DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}"
    )
}

if DEBUG:
    SECRET_KEY = env_str(
        "DJANGO_SECRET_KEY", default="django-insecure-local-development-only"
    )
else:
    SECRET_KEY = env_secret_key("DJANGO_SECRET_KEY")

ALLOWED_HOSTS = env_list(
    "DJANGO_ALLOWED_HOSTS",
    default=["localhost", "127.0.0.1", "[::1]"] if DEBUG else [],
)
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "outbox",
    "users",
    "organizations",
    "config",  # the project's own system checks (config/checks.py)
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
# The API answers a failed CSRF check in its JSON error shape.
CSRF_FAILURE_VIEW = "config.api.csrf_failure"

# The API's rate limits count in this cache (config/throttle.py), so every
# web process must share it: DJANGO_CACHE_URL=redis://host:6379/0 in
# production. The default, local memory, counts per process.
_CACHE_URL = env_str("DJANGO_CACHE_URL", default="")
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": _CACHE_URL,
    }
    if _CACHE_URL.startswith(("redis://", "rediss://"))
    else {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
}
if _CACHE_URL and not _CACHE_URL.startswith(("redis://", "rediss://")):
    raise ImproperlyConfigured(
        f"DJANGO_CACHE_URL must start with redis:// or rediss://, not {_CACHE_URL!r}."
    )
THROTTLE_CACHE = "default"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
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

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_USER_MODEL = "users.User"
# Django's backend, counting wrong passwords per account on every login path.
AUTHENTICATION_BACKENDS = ["config.auth.RateLimitedModelBackend"]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": f"django.contrib.auth.password_validation.{name}"}
    for name in (
        "UserAttributeSimilarityValidator",
        "MinimumLengthValidator",
        "CommonPasswordValidator",
        "NumericPasswordValidator",
    )
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

# Email: printed to the console in debug, sent over SMTP otherwise.
SMTP_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
EMAIL_BACKEND_PATH = env_str(
    "DJANGO_EMAIL_BACKEND",
    default="django.core.mail.backends.console.EmailBackend" if DEBUG else SMTP_BACKEND,
)
MAILERS: dict[str, dict[str, Any]] = {"default": {"BACKEND": EMAIL_BACKEND_PATH}}
if EMAIL_BACKEND_PATH == SMTP_BACKEND:
    MAILERS["default"]["OPTIONS"] = {
        "host": env_str("DJANGO_EMAIL_HOST", default="localhost"),
        "port": env_int("DJANGO_EMAIL_PORT", default=25, minimum=1),
        "username": env_str("DJANGO_EMAIL_HOST_USER", default=""),
        "password": env_str("DJANGO_EMAIL_HOST_PASSWORD", default=""),
        "use_tls": env_bool("DJANGO_EMAIL_USE_TLS", default=False),
        "use_ssl": env_bool("DJANGO_EMAIL_USE_SSL", default=False),
        "timeout": env_int("DJANGO_EMAIL_TIMEOUT", default=10, minimum=1),
    }
# Where people open the links in emails (the invitation's accept link).
SITE_URL = env_str("DJANGO_SITE_URL", default="http://localhost:8000").rstrip("/")
INVITATION_VALID_DAYS = env_int("DJANGO_INVITATION_VALID_DAYS", default=7, minimum=1)
DEFAULT_FROM_EMAIL = env_str("DJANGO_DEFAULT_FROM_EMAIL", default="webmaster@localhost")
SERVER_EMAIL = DEFAULT_FROM_EMAIL

# HTTPS hardening outside debug; behind a TLS-terminating proxy set
# DJANGO_SECURE_PROXY_SSL_HEADER=1 so Django trusts X-Forwarded-Proto.
SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", default=not DEBUG)
# A year of HSTS with subdomains and preload is what `check --deploy` asks
# for; a site still moving to HTTPS opts out with DJANGO_SECURE_HSTS_SECONDS=0
# (or a few minutes) until every subdomain serves HTTPS.
SECURE_HSTS_SECONDS = env_int(
    "DJANGO_SECURE_HSTS_SECONDS", default=0 if DEBUG else 365 * 24 * 3600, minimum=0
)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool(
    "DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", default=not DEBUG
)
SECURE_HSTS_PRELOAD = env_bool("DJANGO_SECURE_HSTS_PRELOAD", default=not DEBUG)
if env_bool("DJANGO_SECURE_PROXY_SSL_HEADER", default=False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_SECURE = not DEBUG
CSRF_COOKIE_SECURE = not DEBUG

# The outbox's settings pass through unparsed: its system checks validate
# them, naming the variable, in manage.py check and when a worker starts.
OUTBOX: dict[str, Any] = {
    name: os.environ[f"OUTBOX_{name}"].strip()
    for name in (
        "POLL_MS",
        "BATCH_SIZE",
        "STUCK_TIMEOUT_MS",
        "MAX_ATTEMPTS",
        "BACKOFF_BASE_MS",
        "BACKOFF_CAP_MS",
        "WORKER_ID",
        "PRUNE_AFTER_DAYS",
        "PRUNE_FAILED_AFTER_DAYS",
        "CONCURRENCY",
        "MAX_PAYLOAD_BYTES",
        "METRICS_PORT",
        "METRICS_TOKEN",
    )
    if os.environ.get(f"OUTBOX_{name}", "").strip()
}
OUTBOX["LISTEN"] = env_bool("OUTBOX_LISTEN", default=True)

# Relays (outbox.relays): each event of the types listed is also published to
# a broker, as a delivery of its own, completed once the broker acknowledged
# it. Off unless the broker's address is set.
_RELAYS: dict[str, Any] = {}
if os.environ.get("OUTBOX_RELAY_NATS_SERVERS", "").strip():
    _RELAYS["bus"] = {
        "BACKEND": "outbox.relays.NatsRelay",
        "EVENT_TYPES": env_list("OUTBOX_RELAY_NATS_EVENT_TYPES", default=["*"]),
        "OPTIONS": {
            "servers": env_list("OUTBOX_RELAY_NATS_SERVERS", default=[]),
            "subject": env_str("OUTBOX_RELAY_NATS_SUBJECT", "events.{event_type}"),
        },
    }
if os.environ.get("OUTBOX_RELAY_AMQP_URL", "").strip():
    _RELAYS["amqp"] = {
        "BACKEND": "outbox.relays.RabbitMQRelay",
        "EVENT_TYPES": env_list("OUTBOX_RELAY_AMQP_EVENT_TYPES", default=["*"]),
        "OPTIONS": {
            "url": env_str("OUTBOX_RELAY_AMQP_URL", ""),
            "exchange": env_str("OUTBOX_RELAY_AMQP_EXCHANGE", "events"),
            "routing_key": env_str("OUTBOX_RELAY_AMQP_ROUTING_KEY", "{event_type}"),
        },
    }
if _RELAYS:
    OUTBOX["RELAYS"] = _RELAYS

# django.tasks on the outbox (outbox.tasks): task.enqueue() commits or rolls
# back with the caller's transaction, and run_outbox_worker runs the tasks.
TASKS = {
    "default": {
        "BACKEND": "outbox.tasks.OutboxTaskBackend",
        # A worker started with --queue NAME runs only that queue's tasks.
        "QUEUES": env_list("OUTBOX_TASK_QUEUES", default=["default"]),
    }
}

LOG_LEVEL = env_choice(
    "DJANGO_LOG_LEVEL",
    default="INFO",
    choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
)
# "json": one JSON object per line, with the fields the worker logs
# (outbox/logs.py), for a log pipeline; "plain" for people.
LOG_FORMAT = env_choice(
    "DJANGO_LOG_FORMAT", default="PLAIN", choices=("PLAIN", "JSON")
).lower()
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "outbox.logs.JsonFormatter"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT},
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        # Once, through ours: in debug, Django's own "django" console handler
        # would print each task's line a second time.
        "django.tasks": {"handlers": ["console"], "propagate": False},
    },
}
