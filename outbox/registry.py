"""Which function handles which event type.

Handlers live in <app>/handlers.py and register with @handler; the app's
ready() imports every such module, so a worker knows all handlers at start.
Events whose type starts with "task:" are django.tasks tasks (outbox.tasks):
one handler runs them all, whatever their path.
"""

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from asgiref.sync import async_to_sync
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import autodiscover_modules

if TYPE_CHECKING:
    from outbox.models import OutboxEvent

HandlerFunction = Callable[["OutboxEvent"], object]
F = TypeVar("F", bound=HandlerFunction)


@dataclass(frozen=True)
class Handler:
    event_type: str
    function: HandlerFunction
    max_attempts: int | None
    #: Called once the event's end (completed, or failed for good) has
    #: committed, with the event; the worker's, not the handler's, business
    #: (outbox.tasks sends django.tasks' task_finished from it).
    ended: Callable[["OutboxEvent"], None] | None = field(
        default=None, repr=False, compare=False
    )
    #: What the worker calls: the function itself, or for an async def
    #: function, a blocking wrapper that runs it on an event loop.
    call: HandlerFunction = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        call = self.function
        if inspect.iscoroutinefunction(call):
            call = async_to_sync(call)
        object.__setattr__(self, "call", call)

    @property
    def name(self) -> str:
        """Return the function's dotted path, for messages and logs."""
        return f"{self.function.__module__}.{self.function.__qualname__}"


_handlers: dict[str, Handler] = {}

#: The event types of tasks: this, then the task function's dotted path.
TASK_EVENT_PREFIX = "task:"


def handler(event_type: str, *, max_attempts: int | None = None) -> Callable[[F], F]:
    """Register the decorated function as the handler of event_type."""
    if not event_type:
        raise ValueError("@handler needs a non-empty event type.")
    if max_attempts is not None and max_attempts < 1:
        raise ValueError("@handler(max_attempts=...) must be at least 1.")

    def register(function: F) -> F:
        new = Handler(event_type, function, max_attempts)
        existing = _handlers.get(event_type)
        if existing is not None and existing.name != new.name:
            raise ImproperlyConfigured(
                f"Two handlers for event type {event_type!r}: {existing.name} and "
                f"{new.name}. Each event type has exactly one handler."
            )
        _handlers[event_type] = new
        return function

    return register


def get_handler(event_type: str) -> Handler | None:
    """Return the handler registered for event_type, if any."""
    found = _handlers.get(event_type)
    if found is None and event_type.startswith(TASK_EVENT_PREFIX):
        return _task_handler(event_type)
    return found


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
    return event_type in _handlers


def registered_event_types() -> list[str]:
    """Return the event types that have a handler, sorted."""
    return sorted(_handlers)


def unregister(event_type: str) -> None:
    """Forget the handler of event_type (for tests that register their own)."""
    _handlers.pop(event_type, None)


def autodiscover() -> None:
    """Import the handlers module of every installed app."""
    autodiscover_modules("handlers")
