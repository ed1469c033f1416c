"""The authentication backend: Django's, with wrong passwords counted.

Every login path (the API's and the admin's) authenticates through here,
so the per-account limit on wrong passwords (config/throttle.py) holds for
all of them. Past the limit an account cannot log in until the window
ends: the API answers 429 with Retry-After (it checks first), the admin
its usual "enter a correct email and password".
"""

from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.backends import ModelBackend
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest
from django.views.decorators.debug import sensitive_variables

from config import throttle
from config.api import Throttled


class RateLimitedModelBackend(ModelBackend):
    @sensitive_variables("password")
    def authenticate(
        self,
        request: HttpRequest | None,
        username: str | None = None,
        password: str | None = None,
        **kwargs: Any,
    ) -> Any:
        address = username or kwargs.get(get_user_model().USERNAME_FIELD)
        if address is None:
            return super().authenticate(request, username, password, **kwargs)
        try:
            throttle.check_password_failures(address)
        except Throttled:
            # Stops authenticate() at once: no other backend is asked.
            raise PermissionDenied from None
        user = super().authenticate(request, username, password, **kwargs)
        if user is None:
            throttle.record_password_failure(address)
        return user
