"""Small helpers shared by the JSON API views: parsing, errors, login."""

import json
from collections.abc import Callable
from functools import wraps
from typing import Any

from django import forms
from django.http import HttpRequest, HttpResponse, JsonResponse

View = Callable[..., HttpResponse]


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


def error(
    status: int, message: str, fields: dict[str, list[str]] | None = None
) -> JsonResponse:
    """Return a JSON error: {"error": message, "fields": {name: [messages]}}."""
    body: dict[str, Any] = {"error": message}
    if fields:
        body["fields"] = fields
    return JsonResponse(body, status=status)


def parse(request: HttpRequest, form_class: type[forms.Form]) -> dict[str, Any]:
    """Return the cleaned JSON body, or raise BadRequest naming each bad field."""
    try:
        data = json.loads(request.body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest({}, "The body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise BadRequest({}, "The body must be a JSON object.")
    form = form_class(data)
    if not form.is_valid():
        raise BadRequest(
            {name: [str(m) for m in messages] for name, messages in form.errors.items()}
        )
    return form.cleaned_data


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
            return error(refused.status, refused.message, fields)

    return wrapper
