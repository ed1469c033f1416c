"""Rate limits of the API, counted in Django's cache.

Each limit is a number of requests per window of seconds for one scope
(logins per client, invitations per organization, ...) and one identity in
it (an address, an account, an organization). Counts live in the cache named
by THROTTLE_CACHE, so every web process must share it: Redis in production
(DJANGO_CACHE_URL), the per-process local memory cache in development.
Identities go into the cache keys as HMACs under SECRET_KEY, so the cache
holds no addresses. An account is counted by its id, found the way the
database matches addresses at login, so spellings the database takes for one
address ("SAM@", and "sam@" with a long s) share one count.

A known trade-off: whoever knows an address can spend its account's
wrong-password budget and lock it out of logging in for the window (15
minutes by default), as with any per-account limit; the per-client limits
bound how many accounts one address can keep locked.

Chosen over a library: django-ratelimit answers 403 (or raises) without
saying when to come back, so a Retry-After would need its window arithmetic
again; django-axes locks accounts out in the database and covers logins only.
The windows here are fixed (counts reset at each multiple of the window), so
a client may spend two windows' worth around a boundary: the limits are set
with that in mind.
"""

import hashlib
import hmac
import math
import time
import unicodedata
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.cache import caches
from django.core.checks import CheckMessage, Error, register

from config.api import Throttled

LOGIN_PER_CLIENT = "login_per_client"
PASSWORD_FAILURES_PER_ACCOUNT = "password_failures_per_account"  # noqa: S105
ACCEPT_PER_CLIENT = "accept_per_client"
INVITATIONS_PER_ACTOR = "invitations_per_actor"
INVITATIONS_PER_ORGANIZATION = "invitations_per_organization"
INVITATION_COOLDOWN_PER_RECIPIENT = "invitation_cooldown_per_recipient"

#: scope: (requests, seconds). THROTTLES in settings overrides any of them.
DEFAULTS: dict[str, tuple[int, int]] = {
    # Every login attempt from one client address.
    LOGIN_PER_CLIENT: (20, 300),
    # Wrong passwords for one account, on every path that checks one: the
    # API's login, the admin's, and accepting an invitation as an existing
    # account.
    PASSWORD_FAILURES_PER_ACCOUNT: (10, 900),
    # Every accept attempt from one client address.
    ACCEPT_PER_CLIENT: (20, 300),
    # Invitations sent by one user, and to one organization.
    INVITATIONS_PER_ACTOR: (50, 3600),
    INVITATIONS_PER_ORGANIZATION: (200, 3600),
    # One invitation per address and organization, then a pause.
    INVITATION_COOLDOWN_PER_RECIPIENT: (1, 600),
}


def rate(scope: str) -> tuple[int, int]:
    """Return (requests, seconds) for scope, settings first."""
    return {**DEFAULTS, **getattr(settings, "THROTTLES", {})}[scope]


def hit(scope: str, identity: str) -> None:
    """Count one request of identity in scope; raise Throttled past the limit."""
    limit, seconds = rate(scope)
    now = time.time()
    count, resets_at = _count(scope, identity, seconds, now)
    if count > limit:
        raise Throttled(_seconds_until(resets_at, now))


def record(scope: str, identity: str) -> None:
    """Count one event (a failure) of identity in scope; check() refuses."""
    _count(scope, identity, rate(scope)[1], time.time())


def check_password_failures(address: str) -> None:
    """Raise Throttled if the account of address is out of wrong passwords."""
    check(PASSWORD_FAILURES_PER_ACCOUNT, account(address))


def record_password_failure(address: str) -> None:
    record(PASSWORD_FAILURES_PER_ACCOUNT, account(address))


def account(address: str) -> str:
    """The identity of the account address logs in to.

    Its id when the database matches the address to an account (by its own
    case rules, the ones login uses), else the address, NFKC-folded.
    """
    user_model = get_user_model()
    found = (
        user_model._default_manager.filter(
            **{f"{user_model.USERNAME_FIELD}__iexact": address}
        )
        .values_list("pk", flat=True)
        .first()
    )
    return f"user:{found}" if found is not None else f"address:{folded(address)}"


def folded(address: str) -> str:
    """address compared as people read it: "Sam@", "SAM@", with a long s, alike."""
    return unicodedata.normalize("NFKC", address).casefold()


def cooldown(scope: str, identity: str) -> None:
    """Let identity through once per window of scope; raise Throttled until
    the window since that time has passed (a pause, not a calendar window)."""
    _, seconds = rate(scope)
    now = time.time()
    key = f"throttle:{scope}:{_digest(identity)}"
    cache = caches[settings.THROTTLE_CACHE]
    if not cache.add(key, now + seconds, timeout=seconds):
        raise Throttled(_seconds_until(cache.get(key, now + seconds), now))


def check(scope: str, identity: str) -> None:
    """Raise Throttled if identity has used up scope, counting nothing.

    For limits on failures: check before the attempt, hit() after a failure.
    """
    limit, seconds = rate(scope)
    now = time.time()
    key, resets_at = _window(scope, identity, seconds, now)
    count = caches[settings.THROTTLE_CACHE].get(key, 0)
    if count >= limit:
        raise Throttled(_seconds_until(resets_at, now))


def client(request: Any) -> str:
    """The address the request came from, as the server saw it.

    Behind a reverse proxy every client shares the proxy's address: have the
    proxy set REMOTE_ADDR (for example uwsgi's or gunicorn's forwarded-allow
    settings), or the per-client limits count the proxy.
    """
    return str(request.META.get("REMOTE_ADDR", ""))


def _count(scope: str, identity: str, seconds: int, now: float) -> tuple[int, float]:
    key, resets_at = _window(scope, identity, seconds, now)
    cache = caches[settings.THROTTLE_CACHE]
    cache.add(key, 0, timeout=seconds + 1)
    try:
        return cache.incr(key), resets_at
    except ValueError:  # expired between add and incr
        cache.add(key, 1, timeout=seconds + 1)
        return 1, resets_at


def _window(scope: str, identity: str, seconds: int, now: float) -> tuple[str, float]:
    window = int(now // seconds)
    return f"throttle:{scope}:{_digest(identity)}:{window}", (window + 1) * seconds


def _digest(identity: str) -> str:
    key = settings.SECRET_KEY.encode()
    message = identity.encode("utf-8", "surrogatepass")
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:32]


def _seconds_until(moment: float, now: float) -> int:
    return max(1, math.ceil(moment - now))


@register()
def check_throttle_settings(**kwargs: Any) -> list[CheckMessage]:
    """THROTTLES names known scopes, each with positive (requests, seconds)."""
    errors: list[CheckMessage] = []
    configured = getattr(settings, "THROTTLES", {})
    if not isinstance(configured, dict):
        return [
            Error(
                "THROTTLES must be a dict of scope: (requests, seconds).",
                id="config.E101",
            )
        ]
    for scope, value in configured.items():
        if scope not in DEFAULTS:
            errors.append(
                Error(
                    f"THROTTLES names an unknown scope {scope!r}.",
                    hint=f"Known scopes: {', '.join(sorted(DEFAULTS))}.",
                    id="config.E102",
                )
            )
        elif not (
            isinstance(value, tuple | list)
            and len(value) == 2
            and all(
                isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value
            )
        ):
            errors.append(
                Error(
                    f"THROTTLES[{scope!r}] must be (requests, seconds), two "
                    f"positive integers, not {value!r}.",
                    id="config.E103",
                )
            )
    if settings.THROTTLE_CACHE not in settings.CACHES:
        errors.append(
            Error(
                f"THROTTLE_CACHE names {settings.THROTTLE_CACHE!r}, "
                "which is not in CACHES.",
                id="config.E104",
            )
        )
    return errors
