"""A transactional outbox for Django.

    from outbox import publish, handler, PermanentFailure, Retry

publish() writes an event in the caller's transaction; a handler registered
with @handler in <app>/handlers.py performs it after commit, in a worker.
"""

from typing import TYPE_CHECKING, Any

from outbox.errors import HandlerNotFound, PermanentFailure, Retry
from outbox.registry import handler

if TYPE_CHECKING:
    from outbox.publishing import NewEvent, publish, publish_many

__all__ = [
    "HandlerNotFound",
    "NewEvent",
    "PermanentFailure",
    "Retry",
    "handler",
    "publish",
    "publish_many",
]
_PUBLISHING = {"NewEvent", "publish", "publish_many"}


def __getattr__(name: str) -> Any:
    # Publishing needs the models, which cannot be imported while Django
    # loads the app registry (and INSTALLED_APPS imports this package first).
    if name in _PUBLISHING:
        from outbox import publishing

        return getattr(publishing, name)
    raise AttributeError(f"module 'outbox' has no attribute {name!r}")
