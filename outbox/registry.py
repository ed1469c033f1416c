"""Which functions an event type's events are delivered to.

Handlers live in <app>/handlers.py and register with @handler; the app's
ready() imports every such module, so a worker knows all handlers at start.
An event type has at most one unnamed handler, and any number of named ones
(@handler("user.invited", name="crm-sync")): its subscribers. publish()
writes one row per subscriber (a delivery, OutboxEvent.subscriber naming
it), so each has its own status, attempts, lease and retries. Events whose
type starts with "task:" are django.tasks tasks (outbox.tasks): one handler
runs them all, whatever their path.
"""

import functools
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from asgiref.sync import async_to_sync
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver
from django.utils.module_loading import autodiscover_modules

if TYPE_CHECKING:
    from outbox.models import OutboxEvent

HandlerFunction = Callable[["OutboxEvent"], object]
F = TypeVar("F", bound=HandlerFunction)


#: What a subscriber's name may be: short, and safe in a URL, a log line, a
#: metric label and a broker's header.
SUBSCRIBER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}")
#: The subscribers of an event type nobody subscribed to: its row fails with
#: HandlerNotFound once its attempts are used, as an unhandled event always has.
UNSUBSCRIBED = ("",)


@dataclass(frozen=True)
class Handler:
    event_type: str
    function: HandlerFunction
    max_attempts: int | None
    #: The subscriber's name; "" for the event type's unnamed handler.
    subscriber: str = ""
    #: Called once the event's end (completed, or failed for good) has
    #: committed, with the event; the worker's, not the handler's, business
    #: (outbox.tasks sends django.tasks' task_finished from it).
    ended: Callable[["OutboxEvent"], None] | None = field(
        default=None, repr=False, compare=False
    )
    #: Whether the handler may use the database: its writes then commit with
    #: its completed mark (outbox.handling). A relay never does, and runs
    #: without a transaction of its own.
    uses_database: bool = field(default=True, compare=False)
    #: What the worker calls: the function itself, or for an async def
    #: function, a blocking wrapper that runs it on an event loop.
    call: HandlerFunction = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        call = self.function
        if inspect.iscoroutinefunction(call):
            call = async_to_sync(call)
        object.__setattr__(self, "call", call)

    @property
    def path(self) -> str:
        """Return the function's dotted path, for messages and logs."""
        return f"{self.function.__module__}.{self.function.__qualname__}"


#: event type -> subscriber name ("" unnamed) -> its handler.
_handlers: dict[str, dict[str, Handler]] = {}

#: The event types of tasks: this, then the task function's dotted path.
TASK_EVENT_PREFIX = "task:"


def handler(
    event_type: str, *, name: str | None = None, max_attempts: int | None = None
) -> Callable[[F], F]:
    """Register the decorated function as a handler of event_type.

    Unnamed, it is the type's handler; with a name, one subscriber of several
    (fan-out), each with its own delivery of every event of the type.
    """
    if not event_type:
        raise ValueError("@handler needs a non-empty event type.")
    if max_attempts is not None and max_attempts < 1:
        raise ValueError("@handler(max_attempts=...) must be at least 1.")
    subscriber = "" if name is None else check_subscriber_name(name)

    def register(function: F) -> F:
        new = Handler(event_type, function, max_attempts, subscriber)
        subscribed = _handlers.setdefault(event_type, {})
        existing = subscribed.get(subscriber)
        if existing is not None and existing.path != new.path:
            raise ImproperlyConfigured(_twice(existing, new))
        subscribed[subscriber] = new
        _subscribers.cache_clear()
        return function

    return register


def check_subscriber_name(name: object) -> str:
    """Return a valid subscriber name, or raise naming what is wrong."""
    if not isinstance(name, str) or not SUBSCRIBER_NAME.fullmatch(name):
        raise ValueError(
            f"@handler(name={name!r}): a subscriber's name is 1 to 100 letters, "
            "digits and . _ : - (starting with a letter or digit)."
        )
    return name


def _twice(existing: Handler, new: Handler) -> str:
    if not new.subscriber:
        return (
            f"Two handlers for event type {new.event_type!r}: {existing.path} and "
            f"{new.path}. An event type has one unnamed handler; give each of "
            'several a name (@handler(..., name="...")) to deliver every event '
            "to each of them."
        )
    return (
        f"Two handlers named {new.subscriber!r} for event type {new.event_type!r}: "
        f"{existing.path} and {new.path}. Names are unique per event type."
    )


def get_handler(event_type: str, subscriber: str = "") -> Handler | None:
    """Return the handler of event_type's subscriber (the unnamed one by default).

    A subscriber may be a relay (outbox.relays): its handler publishes the
    event to the relay's broker.
    """
    found = _handlers.get(event_type, {}).get(subscriber)
    if found is None and event_type.startswith(TASK_EVENT_PREFIX) and not subscriber:
        return _task_handler(event_type)
    if found is None and subscriber:
        return _relay_handler(event_type, subscriber)
    return found


@functools.lru_cache(maxsize=4096)
def _relay_handler(event_type: str, alias: str) -> Handler | None:
    from outbox import relays

    if alias not in relays.relaying(event_type):
        return None
    relay = relays.relay(alias)
    if relay is None:
        return None
    return Handler(event_type, relay.deliver, None, alias, uses_database=False)


def event_types_subscribed_by(name: str) -> list[str]:
    """Return the event types a handler named name subscribes to."""
    return sorted(
        event_type for event_type, named in _handlers.items() if name in named
    )


def subscribers(event_type: str) -> tuple[str, ...]:
    """Return the names of event_type's subscribers, sorted ("" first).

    publish() writes a row for each; an event type nobody subscribed to gets
    one row, for the unnamed handler it lacks (UNSUBSCRIBED).
    """
    return _subscribers(event_type)


@functools.lru_cache(maxsize=4096)
def _subscribers(event_type: str) -> tuple[str, ...]:
    from outbox import relays

    names = {*_handlers.get(event_type, {}), *relays.relaying(event_type)}
    return tuple(sorted(names)) or UNSUBSCRIBED


@receiver(setting_changed)
def _forget_relay_subscribers(*, setting: str, **kwargs: Any) -> None:
    if setting == "OUTBOX":
        _subscribers.cache_clear()
        _relay_handler.cache_clear()


@functools.cache
def _task_handler(event_type: str) -> Handler | None:
    try:
        # Late: django.tasks exists from Django 6.0 on, and the models with it.
        from outbox.tasks import run_task, task_ended
    except ImportError:
        return None
    return Handler(event_type, run_task, None, ended=task_ended)


def is_registered(event_type: str) -> bool:
    """Whether a handler is registered for exactly this event type."""
    return bool(_handlers.get(event_type))


def registered_event_types() -> list[str]:
    """Return the event types that have a handler, sorted."""
    return sorted(event_type for event_type, named in _handlers.items() if named)


def registered_subscribers() -> list[str]:
    """Return the names of the named handlers of every type, sorted."""
    return sorted({name for named in _handlers.values() for name in named if name})


def unregister(event_type: str, subscriber: str | None = None) -> None:
    """Forget event_type's handlers, or one subscriber's (for tests)."""
    if subscriber is None:
        _handlers.pop(event_type, None)
    else:
        _handlers.get(event_type, {}).pop(subscriber, None)
    _subscribers.cache_clear()


def autodiscover() -> None:
    """Import the handlers module of every installed app."""
    autodiscover_modules("handlers")
