"""Exceptions a handler raises to steer what happens to its event."""

from datetime import timedelta


class PermanentFailure(Exception):  # noqa: N818 - named for what the handler means
    """Raise in a handler to end the event as failed at once, without retries."""


class Retry(Exception):  # noqa: N818 - named for what the handler asks for
    """Raise in a handler to retry the event after a chosen delay.

    The attempt still counts towards max_attempts, so a handler that always
    asks for a retry still ends failed.
    """

    def __init__(self, after: timedelta, message: str = "") -> None:
        if after < timedelta(0):
            raise ValueError("Retry(after=...) needs a delay of zero or more.")
        self.after = after
        super().__init__(message or f"retry requested in {after.total_seconds():g}s")


class HandlerNotFound(LookupError):  # noqa: N818 - reads as the error it is
    """No handler is registered for an event's type (and subscriber)."""

    def __init__(self, event_type: str, subscriber: str = "") -> None:
        if subscriber:
            super().__init__(
                f"no handler named {subscriber!r} registered for {event_type!r}"
            )
        else:
            super().__init__(f"no handler registered for {event_type!r}")


class LeaseExpired(Exception):  # noqa: N818 - recorded as the attempt's error class
    """A worker's lease ran out before it recorded an outcome (it died)."""

    def __init__(self, worker: str) -> None:
        super().__init__(
            f"lease expired: worker {worker!r} stopped without recording an outcome"
        )


class UnsupportedIsolationLevel(RuntimeError):  # noqa: N818 - reads as the problem
    """Keyed events need READ COMMITTED, PostgreSQL's default isolation."""
