"""Error reports (the 500 mail to ADMINS, Sentry's frame locals) never carry a
password or an invitation token, however deep the failure."""

import json
import sys

import pytest
from django.contrib.auth.models import AnonymousUser
from django.contrib.sessions.backends.db import SessionStore
from django.test import RequestFactory
from django.views.debug import ExceptionReporter
from django.views.decorators.debug import sensitive_variables

from organizations import views as organization_views
from organizations.models import Role
from organizations.tokens import make_invitation_token
from tests.factories import InvitationFactory
from users import views as user_views

pytestmark = pytest.mark.django_db

PASSWORD = "a-sturdy-passphrase-42"


def report(view, body: dict[str, str]) -> str:
    """The error report of view failing on body: the HTML one, which shows
    each frame's local variables (the plain text one shows none)."""
    return _report(view, _request(body))


def _request(body: dict[str, str]):
    request = RequestFactory().post(
        "/api/x", data=json.dumps(body), content_type="application/json"
    )
    request.user = AnonymousUser()
    request.session = SessionStore()
    return request


def _report(view, request) -> str:
    # Only the request here: the report's first frame is this one.
    with pytest.raises(RuntimeError, match="deep inside"):
        try:
            view(request)
        except RuntimeError:
            text = ExceptionReporter(request, *sys.exc_info()).get_traceback_html()
            raise
    return text


# Stand-ins that fail, with the real functions' signatures (and Django's
# own marking of authenticate's credentials).
@sensitive_variables("credentials")
def failing_authenticate(request=None, **credentials):
    raise RuntimeError("deep inside")


def failing_validate_password(password, user=None, password_validators=None):
    raise RuntimeError("deep inside")


def test_login__a_failure_reports_no_password(monkeypatch):
    monkeypatch.setattr(user_views, "authenticate", failing_authenticate)

    text = report(
        user_views.login_view, {"email": "a@example.com", "password": PASSWORD}
    )

    assert PASSWORD not in text
    assert "********************" in text
    assert "authenticate" in text  # the report reached the frame that failed


def test_accept__a_failure_reports_no_password_or_token(monkeypatch, organization):
    # The failure comes from the services' frames, where the password and
    # the token are arguments of their own.
    monkeypatch.setattr(
        "organizations.services.validate_password", failing_validate_password
    )
    invitation = InvitationFactory.create(organization=organization, role=Role.MEMBER)
    token = make_invitation_token(invitation)

    text = report(
        organization_views.accept_invitation, {"token": token, "password": PASSWORD}
    )

    assert PASSWORD not in text
    assert token not in text
    assert "_user_for" in text  # the report reached the frame that failed
