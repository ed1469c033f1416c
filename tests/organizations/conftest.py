import json
from typing import Any

import pytest
from django.test import Client

from organizations.models import Role
from tests.factories import MembershipFactory, OrganizationFactory, UserFactory


class Api:
    """A JSON client logged in as one user."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def call(self, method: str, path: str, body: Any = None) -> Any:
        response = getattr(self.client, method)(
            f"/api/{path}",
            data=json.dumps(body) if body is not None else None,
            content_type="application/json",
        )
        response.json_body = response.json() if response.content else None
        return response

    def get(self, path: str) -> Any:
        return self.call("get", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self.call("post", path, body if body is not None else {})

    def patch(self, path: str, body: Any) -> Any:
        return self.call("patch", path, body)

    def delete(self, path: str) -> Any:
        return self.call("delete", path)


@pytest.fixture
def organization():
    return OrganizationFactory.create(name="Acme", slug="acme")


@pytest.fixture
def admin(organization):
    return MembershipFactory.create(organization=organization, role=Role.ADMIN).user


@pytest.fixture
def api_as():
    """Return an Api logged in as the given user (or anonymous for None)."""

    def make(user=None) -> Api:
        client = Client()
        if user is not None:
            client.force_login(user)
        return Api(client)

    return make


@pytest.fixture
def member_with(organization):
    """Return a new user holding role in the organization."""

    def make(role: str):
        return MembershipFactory.create(organization=organization, role=role).user

    return make


@pytest.fixture
def outsider():
    """A user who belongs to another organization only."""
    return MembershipFactory.create(role=Role.ADMIN).user


@pytest.fixture
def stranger_user():
    return UserFactory.create()
