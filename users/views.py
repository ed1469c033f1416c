from django import forms
from django.contrib.auth import authenticate, login, logout
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import get_token
from django.views.decorators.csrf import ensure_csrf_cookie
from django.views.decorators.http import require_GET, require_POST

from config.api import error, handle_errors, parse


class LoginForm(forms.Form):
    email = forms.EmailField()
    password = forms.CharField(strip=False)


@require_GET
@ensure_csrf_cookie
def csrf(request: HttpRequest) -> JsonResponse:
    """Set the CSRF cookie; browsers send it back as X-CSRFToken."""
    return JsonResponse({"csrf_token": get_token(request)})


@require_POST
@handle_errors
def login_view(request: HttpRequest) -> HttpResponse:
    """Log in with email and password (session authentication)."""
    data = parse(request, LoginForm)
    user = authenticate(request, username=data["email"], password=data["password"])
    if user is None:
        return error(400, "The email or password is wrong.")
    login(request, user)
    return JsonResponse({"id": user.pk, "email": user.get_username()})


@require_POST
def logout_view(request: HttpRequest) -> HttpResponse:
    """End the session."""
    logout(request)
    return HttpResponse(status=204)
