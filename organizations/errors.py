"""Domain errors the services raise; the API turns them into HTTP statuses."""

from config.api import ApiError


class DomainError(ApiError):
    """A request the domain refuses (HTTP 400)."""


class Conflict(DomainError):  # noqa: N818 - reads as the HTTP status it becomes
    """The request clashes with the current state (HTTP 409)."""

    status = 409


class InvalidToken(DomainError):  # noqa: N818 - reads as what went wrong
    """An invitation token that is expired, revoked, used or tampered with."""


class NotFound(DomainError):  # noqa: N818 - reads as the HTTP status it becomes
    """Nothing the caller may see has this name (HTTP 404)."""

    status = 404


class Forbidden(DomainError):  # noqa: N818 - reads as the HTTP status it becomes
    """The caller's role does not allow this (HTTP 403)."""

    status = 403


class WrongPassword(DomainError):  # noqa: N818 - reads as what went wrong
    """The password of an existing account did not match (HTTP 400)."""
