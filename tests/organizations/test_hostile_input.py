"""Hostile input: every endpoint answers a clear 4xx in the JSON error shape,
and writes nothing.

Table-driven: each body below goes to each endpoint that takes a body, each
bad value into each of its fields; then oversized bodies, wrong methods and
CSRF failures. A 500 anywhere, or any row written, fails.
"""

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.conf import settings
from django.test import Client
from django.test.client import BOUNDARY, MULTIPART_CONTENT, encode_multipart

from organizations.models import (
    AuditEntry,
    Invitation,
    Membership,
    Organization,
    Project,
)
from organizations.tokens import make_invitation_token
from outbox.models import OutboxEvent
from tests.factories import InvitationFactory, MembershipFactory, OrganizationFactory
from tests.outbox.sessions import (
    InThread,
    backend_pid,
    open_transaction,
    waiting_for_a_lock,
)
from users.models import User

GUARDED = (User, Organization, Invitation, Membership, Project, AuditEntry, OutboxEvent)
PASSWORD = "a-sturdy-passphrase-42"


class Endpoint:
    def __init__(
        self, method: str, path: str, valid: dict[str, str], *, as_admin: bool = True
    ) -> None:
        self.method, self.path, self.valid, self.as_admin = (
            method,
            path,
            valid,
            as_admin,
        )

    def __repr__(self) -> str:
        return f"{self.method.upper()} {self.path}"


ENDPOINTS = [
    Endpoint(
        "post",
        "auth/login",
        {"email": "x@example.com", "password": "p"},
        as_admin=False,
    ),
    Endpoint(
        "post",
        "invitations/accept",
        {"token": "<token>", "password": PASSWORD},
        as_admin=False,
    ),
    Endpoint("post", "organizations", {"name": "New", "slug": "new"}),
    Endpoint(
        "post",
        "organizations/acme/invitations",
        {"email": "new@example.com", "role": "member"},
    ),
    Endpoint("patch", "organizations/acme/members/<member>", {"role": "viewer"}),
    Endpoint("post", "organizations/acme/projects", {"name": "New project"}),
]

#: Bodies no endpoint can take, whatever it expects.
RAW_BODIES = {
    "arrays nested 100,000 deep": "[" * 100_000 + "]" * 100_000,
    "an integer of 5,000 digits": '{"name": ' + "9" * 5000 + "}",
    "not JSON": "{'name': 'x'}",
    "not UTF-8": b'{"name": "\xff"}',
    "an array": '["name"]',
    "a string": '"name"',
}

#: Values no string field can take (JSON text, so escapes stay escapes).
BAD_VALUES = {
    "a lone surrogate": '"a\\ud800b"',
    "a NUL character": '"a\\u0000b"',
    "a list": '["x"]',
    "an object": '{"x": 1}',
    "a number": "1",
    "a boolean": "true",
    "null": "null",
}


@pytest.fixture
def world(db) -> dict[str, Any]:
    """An organization with an admin, a member and an open invitation."""
    admin = MembershipFactory.create(
        organization=OrganizationFactory.create(slug="acme"), role="admin"
    )
    member = MembershipFactory.create(organization=admin.organization)
    invitation = InvitationFactory.create(
        organization=admin.organization, invited_by=admin.user
    )
    return {
        "admin": admin.user,
        "<member>": str(member.user_id),
        "<token>": make_invitation_token(invitation),
    }


def rows() -> dict[str, list[dict[str, Any]]]:
    """Every row of the guarded models (but last_login, which logging the
    test's client in sets)."""
    found = {
        model.__name__: list(model._default_manager.order_by("pk").values())
        for model in GUARDED
    }
    for user in found["User"]:
        del user["last_login"]
    return found


def send(
    world: dict[str, Any],
    endpoint: Endpoint,
    body: str | bytes,
    *,
    client: Client | None = None,
    method: str | None = None,
):
    client = client or Client()
    if endpoint.as_admin:
        client.force_login(world["admin"])
    path = endpoint.path.replace("<member>", world["<member>"])
    return getattr(client, method or endpoint.method)(
        f"/api/{path}", data=body, content_type="application/json"
    )


def valid_body(world: dict[str, Any], endpoint: Endpoint) -> dict[str, str]:
    return {name: world.get(value, value) for name, value in endpoint.valid.items()}


def with_value(
    world: dict[str, Any], endpoint: Endpoint, field: str, value: str
) -> str:
    """The endpoint's valid body as JSON text, with one field's value replaced."""
    parts = [
        f"{json.dumps(name)}: {value if name == field else json.dumps(given)}"
        for name, given in valid_body(world, endpoint).items()
    ]
    return "{" + ", ".join(parts) + "}"


def assert_refused(response, status: int = 400) -> None:
    assert response.status_code == status, response.content[:300]
    assert response["Content-Type"] == "application/json"
    assert isinstance(response.json()["error"], str)


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=repr)
@pytest.mark.parametrize("body", RAW_BODIES.values(), ids=RAW_BODIES.keys())
def test_a_body_no_endpoint_can_take__is_400_and_writes_nothing(world, endpoint, body):
    before = rows()

    response = send(world, endpoint, body)

    assert_refused(response)
    assert rows() == before


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=repr)
@pytest.mark.parametrize("value", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_a_bad_value_in_any_field__is_400_naming_it_and_writes_nothing(
    world, endpoint, value
):
    for field in endpoint.valid:
        before = rows()

        response = send(world, endpoint, with_value(world, endpoint, field, value))

        assert_refused(response)
        assert field in response.json()["fields"], (field, response.json())
        assert rows() == before


@pytest.mark.parametrize(
    "endpoint", [e for e in ENDPOINTS if "email" in e.valid], ids=repr
)
@pytest.mark.parametrize("length", [255, 320, 321])
def test_an_email_longer_than_its_column__is_400(world, endpoint, length):
    address = "a" * (length - len("@example.com")) + "@example.com"
    before = rows()

    response = send(
        world, endpoint, with_value(world, endpoint, "email", json.dumps(address))
    )

    assert_refused(response)
    assert "email" in response.json()["fields"]
    assert rows() == before


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=repr)
def test_a_body_over_the_upload_limit__is_413(world, endpoint):
    body = json.dumps(
        {
            **valid_body(world, endpoint),
            "padding": "x" * settings.DATA_UPLOAD_MAX_MEMORY_SIZE,
        }
    )
    before = rows()

    response = send(world, endpoint, body)

    assert_refused(response, 413)
    assert rows() == before


#: Every URL of the API with the methods it allows.
ALLOWED = {
    "auth/csrf": "GET, HEAD",
    "auth/login": "POST",
    "auth/logout": "POST",
    "organizations": "GET, POST, HEAD",
    "organizations/acme/invitations": "GET, POST, HEAD",
    "organizations/acme/invitations/1": "DELETE",
    "invitations/accept": "POST",
    "organizations/acme/members": "GET, HEAD",
    "organizations/acme/members/1": "PATCH, DELETE",
    "organizations/acme/projects": "GET, POST, HEAD",
}


@pytest.mark.parametrize(("path", "allowed"), ALLOWED.items())
def test_a_wrong_method__is_405_with_allow(world, path, allowed):
    client = Client()
    client.force_login(world["admin"])
    before = rows()

    response = client.put(f"/api/{path}", data="{}", content_type="application/json")

    assert_refused(response, 405)
    assert response["Allow"] == allowed
    assert rows() == before


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=repr)
def test_a_missing_csrf_token__is_403_and_writes_nothing(world, endpoint):
    before = rows()

    response = send(
        world,
        endpoint,
        json.dumps(valid_body(world, endpoint)),
        client=Client(enforce_csrf_checks=True),
    )

    assert_refused(response, 403)
    assert "CSRF" in response.json()["error"]
    assert rows() == before


def csrf_client(world: dict[str, Any], endpoint: Endpoint) -> tuple[Client, str]:
    """A client that checks CSRF, logged in as the endpoint needs, and its token."""
    client = Client(enforce_csrf_checks=True)
    if endpoint.as_admin:
        client.force_login(world["admin"])
    return client, client.get("/api/auth/csrf").json()["csrf_token"]


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=repr)
@pytest.mark.parametrize(
    "content_type", ["multipart/form-data", "application/x-www-form-urlencoded"]
)
def test_a_body_that_is_not_json__is_415_and_writes_nothing(
    world, endpoint, content_type
):
    # The CSRF middleware parses form bodies before the view: the view must
    # not then read the body raw (RawPostDataException, a 500).
    client, token = csrf_client(world, endpoint)
    path = endpoint.path.replace("<member>", world["<member>"])
    before = rows()

    if content_type == "multipart/form-data":
        response = client.generic(
            endpoint.method.upper(),
            f"/api/{path}",
            encode_multipart(
                BOUNDARY,
                {**valid_body(world, endpoint), "csrfmiddlewaretoken": token},
            ),
            content_type=MULTIPART_CONTENT,
            HTTP_X_CSRFTOKEN=token,
        )
    else:
        response = client.generic(
            endpoint.method.upper(),
            f"/api/{path}",
            "name=x",
            content_type=content_type,
            HTTP_X_CSRFTOKEN=token,
        )

    assert_refused(response, 415)
    assert rows() == before


@pytest.mark.parametrize(
    "body",
    [
        # A part whose headers never end.
        "--xyz\r\nContent-Disposition: form-data; name=a" + "x" * 100_000,
        "&".join(f"f{n}=x" for n in range(1500)),  # over DATA_UPLOAD_MAX_NUMBER_FIELDS
    ],
    ids=["broken multipart", "too many form fields"],
)
def test_a_body_django_refuses_before_the_view__is_a_json_4xx(world, body):
    client, token = csrf_client(world, ENDPOINTS[0])
    content_type = (
        "multipart/form-data; boundary=xyz"
        if body.startswith("--xyz")
        else "application/x-www-form-urlencoded"
    )

    response = client.generic(
        "POST",
        "/api/auth/login",
        body,
        content_type=content_type,
        HTTP_X_CSRFTOKEN=token,
    )

    # The CSRF middleware reads a POST's form before the view runs, and
    # Django's own 400 (handler400) answers what it cannot read.
    assert_refused(response, 400)
    assert response.json() == {"error": "The request could not be read."}


@pytest.mark.parametrize(
    "path", ["organizations", "organizations/acme/members", "auth/csrf"]
)
def test_head__is_answered_wherever_get_is(world, path):
    client = Client()
    client.force_login(world["admin"])

    assert client.head(f"/api/{path}").status_code == 200


def test_inviting_a_unicode_case_variant_of_an_invited_address__is_no_500(world):
    # PostgreSQL's UPPER() (iexact) and LOWER() (the one-open-invitation
    # constraint) disagree on "İ": the variant must not reach the insert.
    client = Client()
    client.force_login(world["admin"])

    def invite(address: str) -> Any:
        return client.post(
            "/api/organizations/acme/invitations",
            data=json.dumps({"email": address, "role": "member"}),
            content_type="application/json",
        )

    first = invite("ian@example.com")
    variant = invite("\u0130an@example.com")

    assert first.status_code == 201
    assert variant.status_code in (201, 409), variant.content
    assert (
        Invitation.objects.filter(
            email__in=["ian@example.com", "\u0130an@example.com"],
            accepted_at__isnull=True,
            revoked_at__isnull=True,
        ).count()
        == 1
    )


def test_an_unknown_api_url__is_404_in_the_json_shape(db):
    assert_refused(Client().get("/api/no-such-thing"), 404)
    assert_refused(Client().get("/api"), 404)


def test_an_unknown_admin_url__keeps_djangos_page(db, admin_client):
    response = admin_client.get("/admin/no-such-thing/")

    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


@pytest.mark.django_db(transaction=True)
def test_two_first_accepts_for_one_new_address__the_second_is_409(organization):
    # Two organizations invite one new address; both accepts create the
    # account. The second waits on the first's unique email, then fails.
    first = InvitationFactory.create(organization=organization, email="new@example.com")
    second = InvitationFactory.create(email="new@example.com")
    backends: list[int] = []

    def accept(invitation: Invitation) -> Callable[[], Any]:
        def run() -> Any:
            backends.append(backend_pid())
            return Client().post(
                "/api/invitations/accept",
                data=json.dumps(
                    {"token": make_invitation_token(invitation), "password": PASSWORD}
                ),
                content_type="application/json",
            )

        return run

    with open_transaction(accept(first)) as accepted:
        racer = InThread(accept(second))
        deadline = time.monotonic() + 10
        while not (len(backends) == 2 and waiting_for_a_lock(backends[1])):
            assert time.monotonic() < deadline, "the second accept never waited"
            assert racer.thread.is_alive(), "the second accept did not wait"
            time.sleep(0.01)

    response = racer.join()
    assert accepted.status_code == 201
    assert_refused(response, 409)
    assert User.objects.filter(email="new@example.com").count() == 1
    assert Membership.objects.filter(user__email="new@example.com").count() == 1
