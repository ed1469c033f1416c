"""Small helpers shared by the JSON API views: parsing, errors, methods.

Whatever a client sends, the API answers in one shape, {"error": message,
"fields": {name: [messages]}}, with a 4xx status, and writes nothing: bodies
that are not JSON, too deep, too large or of the wrong types, strings
PostgreSQL cannot store, a wrong method, a missing CSRF token, an unknown
URL. A 500 (a bug) has the same shape, without details.
"""

import json
import re
from collections.abc import Callable
from functools import wraps
from typing import Any

from django import forms
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.views import csrf, defaults
from django.views.decorators.debug import sensitive_variables

View = Callable[..., HttpResponse]

#: Characters no text column can hold: NUL, and the halves of a surrogate
#: pair that JSON's "\ud800" escapes can produce on their own (not UTF-8).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


class ApiError(Exception):
    """A refusal with a message fit for the caller and its HTTP status."""

    status = 400

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class BadRequest(Exception):  # noqa: N818 - reads as the HTTP status it becomes
    """The request body is not what the endpoint expects."""

    def __init__(
        self, fields: dict[str, list[str]], message: str = "Invalid input."
    ) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields


class TooLarge(ApiError):  # noqa: N818 - reads as the HTTP status it becomes
    """The body is larger than DATA_UPLOAD_MAX_MEMORY_SIZE (HTTP 413)."""

    status = 413


class UnsupportedMediaType(ApiError):  # noqa: N818 - reads as the HTTP status
    """The body is not JSON (HTTP 415)."""

    status = 415


class Throttled(ApiError):  # noqa: N818 - reads as the HTTP status it becomes
    """Too many requests of one kind; try again after retry_after seconds."""

    status = 429

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"Too many requests: try again in {retry_after} seconds.")
        self.retry_after = retry_after


def error(
    status: int, message: str, fields: dict[str, list[str]] | None = None
) -> JsonResponse:
    """Return a JSON error: {"error": message, "fields": {name: [messages]}}."""
    body: dict[str, Any] = {"error": message}
    if fields:
        body["fields"] = fields
    return JsonResponse(body, status=status)


@sensitive_variables("body", "data", "form")
def parse(request: HttpRequest, form_class: type[forms.Form]) -> dict[str, Any]:
    """Return the cleaned JSON body, or raise BadRequest naming each bad field.

    Each field the form declares must come as a JSON string (a list is not
    turned into the text "['x']"), holding only characters a database can
    store; fields the form does not declare are ignored, unread. Any other
    content type is refused before the body is read (CSRF middleware may
    have parsed a form body already, after which it cannot be read raw).
    """
    if request.content_type != "application/json":
        raise UnsupportedMediaType("Send the body as application/json.")
    try:
        body = request.body
    except RequestDataTooBig:
        raise TooLarge(
            f"The body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes."
        ) from None
    try:
        data = json.loads(body or b"{}")
    except (ValueError, RecursionError):
        # ValueError: not JSON, not UTF-8, or an integer of more digits than
        # Python converts; RecursionError: arrays nested thousands deep.
        raise BadRequest({}, "The body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise BadRequest({}, "The body must be a JSON object.")
    form = form_class(
        {name: data[name] for name in form_class.base_fields if name in data}
    )
    wrong = {
        name: [problem]
        for name, value in form.data.items()
        if (problem := _wrong_value(value))
    }
    if wrong:
        raise BadRequest(wrong)
    if not form.is_valid():
        raise BadRequest(
            {name: [str(m) for m in messages] for name, messages in form.errors.items()}
        )
    return form.cleaned_data


def _wrong_value(value: object) -> str:
    if not isinstance(value, str):
        return "Expected a string."
    if _UNSTORABLE.search(value):
        return "Contains a character that cannot be stored (NUL or a lone surrogate)."
    return ""


def json_api(view: View) -> View:
    """Require a logged-in user; turn domain and input errors into JSON."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not request.user.is_authenticated:
            return error(401, "Log in first.")
        return handle_errors(view)(request, *args, **kwargs)

    return wrapper


def handle_errors(view: View) -> View:
    """Turn BadRequest and domain errors into JSON responses."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        try:
            return view(request, *args, **kwargs)
        except BadRequest as bad:
            return error(400, bad.message, bad.fields)
        except ApiError as refused:
            fields = {refused.field: [refused.message]} if refused.field else None
            response = error(refused.status, refused.message, fields)
            if isinstance(refused, Throttled):
                response["Retry-After"] = str(refused.retry_after)
            return response

    return wrapper


def methods(*allowed: str) -> Callable[[View], View]:
    """Answer other methods 405 with Allow, in the JSON error shape.

    HEAD is allowed wherever GET is, as Django's own views allow it.
    """
    if "GET" in allowed and "HEAD" not in allowed:
        allowed = (*allowed, "HEAD")

    def decorate(view: View) -> View:
        @wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if request.method not in allowed:
                response = error(405, f"Use {' or '.join(allowed)}.")
                response["Allow"] = ", ".join(allowed)
                return response
            return view(request, *args, **kwargs)

        return wrapper

    return decorate


def _is_api(request: HttpRequest) -> bool:
    return request.path == "/api" or request.path.startswith("/api/")


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    """CSRF_FAILURE_VIEW: a 403 in the JSON error shape under /api/."""
    if not _is_api(request):
        return csrf.csrf_failure(request, reason)
    return error(
        403,
        "CSRF check failed: send the csrftoken cookie's value as X-CSRFToken "
        "(GET /api/auth/csrf sets it).",
    )


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    """handler400: a body Django itself refused (a broken multipart, too
    many fields), answered in JSON under /api/."""
    if not _is_api(request):
        return defaults.bad_request(request, exception)
    return error(400, "The request could not be read.")


def permission_denied(request: HttpRequest, exception: Exception) -> HttpResponse:
    """handler403: JSON under /api/, Django's page elsewhere."""
    if not _is_api(request):
        return defaults.permission_denied(request, exception)
    return error(403, "Not allowed.")


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """handler404: JSON under /api/, Django's page elsewhere (the admin)."""
    if not _is_api(request):
        return defaults.page_not_found(request, exception or Http404())
    return error(404, "Nothing here.")


def server_error(request: HttpRequest) -> HttpResponse:
    """handler500: a bug, reported to the admins; no details for the caller."""
    if not _is_api(request):
        return defaults.server_error(request)
    return error(500, "Something went wrong on our side.")
