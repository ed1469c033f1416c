import pytest
from django.urls import reverse

from tests.factories import (
    AuditEntryFactory,
    InvitationFactory,
    MembershipFactory,
    ProjectFactory,
)

pytestmark = pytest.mark.django_db

MODELS = [
    ("users", "user"),
    ("organizations", "organization"),
    ("organizations", "membership"),
    ("organizations", "invitation"),
    ("organizations", "project"),
    ("organizations", "auditentry"),
]


@pytest.fixture
def populated() -> None:
    MembershipFactory.create()
    InvitationFactory.create()
    ProjectFactory.create()
    AuditEntryFactory.create()


@pytest.mark.parametrize(("app", "model"), MODELS)
def test_changelist__renders_with_search(admin_client, populated, app, model) -> None:
    url = reverse(f"admin:{app}_{model}_changelist")

    assert admin_client.get(url).status_code == 200
    assert admin_client.get(url, {"q": "example"}).status_code == 200


@pytest.mark.parametrize(("app", "model"), MODELS[:-1])
def test_add_form__renders(admin_client, app, model) -> None:
    response = admin_client.get(reverse(f"admin:{app}_{model}_add"))

    assert response.status_code == 200


def test_audit_entries__are_read_only(admin_client) -> None:
    entry = AuditEntryFactory.create()

    add = admin_client.get(reverse("admin:organizations_auditentry_add"))
    change = admin_client.post(
        reverse("admin:organizations_auditentry_change", args=[entry.pk]),
        {"action": "tampered"},
    )
    delete = admin_client.post(
        reverse("admin:organizations_auditentry_delete", args=[entry.pk]),
        {"post": "yes"},
    )

    entry.refresh_from_db()
    assert add.status_code == 403
    assert change.status_code == 403
    assert delete.status_code == 403
    assert entry.action == "project.created"


def test_user_admin__creates_a_user_by_email(admin_client) -> None:
    response = admin_client.post(
        reverse("admin:users_user_add"),
        {
            "email": "new.person@example.com",
            "password1": "a-long-password-1",
            "password2": "a-long-password-1",
        },
    )

    assert response.status_code == 302
    from users.models import User

    assert User.objects.get(email="new.person@example.com").check_password(
        "a-long-password-1"
    )
