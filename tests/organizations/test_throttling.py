"""Rate limits: logins, accepts and invitations, answered 429 with Retry-After.

Run on the local memory cache of the default settings and on the Redis that
production uses (DJANGO_CACHE_URL); each test on Redis has a key prefix of
its own (clearing would flush the whole Redis database).
"""

import json
import secrets
from typing import Any

import pytest
from django.core.cache import caches
from django.test import Client, override_settings

from config.throttle import check_throttle_settings
from organizations.models import Invitation, Role
from organizations.tokens import make_invitation_token
from outbox.models import OutboxEvent
from tests.factories import InvitationFactory, MembershipFactory, UserFactory

pytestmark = pytest.mark.django_db

PASSWORD = "correct horse battery staple"


@pytest.fixture(params=["locmem", "redis"])
def cache(request: pytest.FixtureRequest) -> Any:
    """The cache the limits count in: each backend in turn."""
    if request.param == "locmem":
        yield
        return
    redis = {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": "redis://127.0.0.1:6379/0",
        "KEY_PREFIX": f"outbox-test-{secrets.token_hex(8)}",
        "TIMEOUT": 3600,
    }
    with override_settings(CACHES={"default": redis}):
        caches["default"].set("probe", 1)  # Redis answers, or the test errors
        yield


def post(
    path: str, body: dict[str, Any], *, client: Client | None = None, ip="10.0.0.1"
):
    response = (client or Client()).post(
        f"/api/{path}",
        data=json.dumps(body),
        content_type="application/json",
        REMOTE_ADDR=ip,
    )
    return response


def login(email: str, password: str, *, ip: str = "10.0.0.1"):
    return post("auth/login", {"email": email, "password": password}, ip=ip)


def assert_throttled(response) -> None:
    assert response.status_code == 429
    retry_after = int(response["Retry-After"])
    assert 1 <= retry_after <= 3600
    assert response.json() == {
        "error": f"Too many requests: try again in {retry_after} seconds."
    }


@override_settings(THROTTLES={"login_per_client": (3, 3600)})
def test_login__is_limited_per_client_address(cache):
    user = UserFactory.create()

    answers = [login(user.email, "wrong").status_code for _ in range(3)]
    refused = login(user.email, PASSWORD)
    elsewhere = login(user.email, PASSWORD, ip="10.0.0.2")

    assert answers == [400, 400, 400]
    assert_throttled(refused)
    assert elsewhere.status_code == 200


@override_settings(THROTTLES={"password_failures_per_account": (2, 3600)})
def test_login__wrong_passwords_lock_the_account_from_every_address(cache):
    user = UserFactory.create()
    other = UserFactory.create()

    login(user.email, "wrong", ip="10.0.0.1")
    login(user.email.upper(), "wrong", ip="10.0.0.2")
    refused = login(user.email, PASSWORD, ip="10.0.0.3")
    unaffected = login(other.email, PASSWORD, ip="10.0.0.3")

    assert_throttled(refused)
    assert unaffected.status_code == 200


@override_settings(THROTTLES={"password_failures_per_account": (2, 3600)})
def test_login__spellings_the_database_takes_for_one_address_share_its_count(cache):
    # PostgreSQL's UPPER() matches a long s to "S": "\u017fam@" logs in
    # to sam's account, so it must spend the same count.
    user = UserFactory.create(email="sam@example.com")

    login("sam@example.com", "wrong")
    login("SAM@example.com", "wrong")

    assert_throttled(login("\u017fam@example.com", PASSWORD))
    assert_throttled(login(user.email, PASSWORD))


@override_settings(THROTTLES={"password_failures_per_account": (1, 3600)})
def test_backend__counts_wrong_passwords_given_as_the_username_field(cache):
    from django.contrib.auth import authenticate

    user = UserFactory.create()

    assert authenticate(None, email=user.email, password="wrong") is None
    assert authenticate(None, email=user.email, password=PASSWORD) is None
    assert authenticate(None, username=user.email, password=PASSWORD) is None


@override_settings(THROTTLES={"password_failures_per_account": (2, 3600)})
def test_admin_login__wrong_passwords_count_against_the_account(cache):
    # The admin's login form goes through the same backend as the API's.
    staff = UserFactory.create(is_staff=True, is_superuser=True)

    def admin_login(password: str) -> bool:
        client = Client()
        client.post("/admin/login/", {"username": staff.email, "password": password})
        return client.get("/admin/").status_code == 200

    assert admin_login(PASSWORD)
    failed = [admin_login("wrong") for _ in range(2)]

    assert failed == [False, False]
    assert not admin_login(PASSWORD)
    assert_throttled(login(staff.email, PASSWORD))


@override_settings(THROTTLES={"password_failures_per_account": (2, 3600)})
def test_accept__wrong_passwords_count_against_the_accounts_login_limit(
    cache, organization
):
    # Accepting checks an existing account's password: no way round login's.
    user = UserFactory.create(email="known@example.com")
    invitation = InvitationFactory.create(
        organization=organization, email="known@example.com"
    )
    token = make_invitation_token(invitation)

    wrong = [
        post("invitations/accept", {"token": token, "password": "wrong"}).status_code
        for _ in range(2)
    ]
    refused = login(user.email, PASSWORD)

    assert wrong == [400, 400]
    assert_throttled(refused)
    assert_throttled(post("invitations/accept", {"token": token, "password": PASSWORD}))


@override_settings(THROTTLES={"accept_per_client": (2, 3600)})
def test_accept__is_limited_per_client_address(cache):
    answers = [
        post("invitations/accept", {"token": "x", "password": "y"}).status_code
        for _ in range(2)
    ]

    assert answers == [400, 400]
    assert_throttled(post("invitations/accept", {"token": "x", "password": "y"}))
    assert (
        post("invitations/accept", {"token": "x", "password": "y"}, ip="10.0.0.9")
    ).status_code == 400


def invite(admin, email: str, slug: str = "acme"):
    client = Client()
    client.force_login(admin)
    return post(
        f"organizations/{slug}/invitations",
        {"email": email, "role": "member"},
        client=client,
    )


@override_settings(THROTTLES={"invitations_per_actor": (2, 3600)})
def test_invitations__are_limited_per_sender_and_write_nothing_past_it(cache, admin):
    sent = [invite(admin, f"a{n}@example.com").status_code for n in range(2)]
    refused = invite(admin, "a2@example.com")

    assert sent == [201, 201]
    assert_throttled(refused)
    assert not Invitation.objects.filter(email="a2@example.com").exists()
    assert OutboxEvent.objects.filter(event_type="user.invited").count() == 2


@override_settings(THROTTLES={"invitations_per_organization": (2, 3600)})
def test_invitations__are_limited_per_organization_across_its_admins(
    cache, admin, organization
):
    colleague = MembershipFactory.create(organization=organization, role=Role.ADMIN)

    invite(admin, "b0@example.com")
    invite(colleague.user, "b1@example.com")

    assert_throttled(invite(colleague.user, "b2@example.com"))


def test_invitations__one_per_address_and_organization_then_a_pause(
    cache, admin, organization
):
    elsewhere = MembershipFactory.create(
        organization__slug="elsewhere", role=Role.ADMIN
    ).user

    first = invite(admin, "c@example.com")
    again = invite(admin, "C@example.com")
    other_address = invite(admin, "d@example.com")
    other_organization = invite(elsewhere, "c@example.com", slug="elsewhere")

    assert first.status_code == 201
    assert_throttled(again)
    assert 590 <= int(again["Retry-After"]) <= 600
    assert (other_address.status_code, other_organization.status_code) == (201, 201)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"logins": (1, 1)}, "THROTTLES names an unknown scope 'logins'."),
        (
            {"login_per_client": (0, 60)},
            "THROTTLES['login_per_client'] must be (requests, seconds)",
        ),
        ({"login_per_client": "5/m"}, "THROTTLES['login_per_client'] must be"),
        ([], "THROTTLES must be a dict"),
    ],
)
def test_settings__a_bad_throttles_value_fails_the_check_naming_it(value, message):
    with override_settings(THROTTLES=value):
        [error] = check_throttle_settings()

    assert error.msg.startswith(message)


def test_settings__the_defaults_pass_the_check():
    assert check_throttle_settings() == []
