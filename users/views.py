from django import forms
from django.contrib.auth import authenticate, login, logout
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import get_token
from django.views.decorators.csrf import ensure_csrf_cookie
from django.views.decorators.debug import sensitive_post_parameters, sensitive_variables

from config import throttle
from config.api import error, handle_errors, methods, parse


class LoginForm(forms.Form):
    # The column's length: a longer address names no account.
    email = forms.EmailField(max_length=254)
    password = forms.CharField(strip=False)


@methods("GET")
@ensure_csrf_cookie
def csrf(request: HttpRequest) -> JsonResponse:
    """Set the CSRF cookie; browsers send it back as X-CSRFToken."""
    return JsonResponse({"csrf_token": get_token(request)})


@sensitive_post_parameters("password")
@sensitive_variables("data")
@methods("POST")
@handle_errors
def login_view(request: HttpRequest) -> HttpResponse:
    """Log in with email and password (session authentication).

    Rate limited per client address, and per account on wrong passwords
    (config/throttle.py, config/auth.py): guessing is slow from one place
    and for one account from many.
    """
    throttle.hit(throttle.LOGIN_PER_CLIENT, throttle.client(request))
    data = parse(request, LoginForm)
    # The backend counts wrong passwords (config/auth.py); checked here
    # first, so a locked account is told when to come back.
    throttle.check_password_failures(data["email"])
    user = authenticate(request, username=data["email"], password=data["password"])
    if user is None:
        return error(400, "The email or password is wrong.")
    login(request, user)
    return JsonResponse({"id": user.pk, "email": user.get_username()})


@methods("POST")
def logout_view(request: HttpRequest) -> HttpResponse:
    """End the session."""
    logout(request)
    return HttpResponse(status=204)
