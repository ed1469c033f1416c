"""The reference app's task: creating a project enqueues its welcome digest."""

import pytest
from django.db import transaction
from django.tasks import TaskResultStatus

from organizations import services
from organizations.emails import message_id
from organizations.models import Project, Role
from organizations.tasks import send_project_welcome_digest
from outbox.models import OutboxEvent
from outbox.testing import drain
from tests.factories import ProjectFactory

pytestmark = pytest.mark.django_db

TASK = "task:organizations.tasks.send_project_welcome_digest"


def digest_event() -> OutboxEvent:
    return OutboxEvent.objects.get(event_type=TASK)


def test_create_project_view__enqueues_the_digest_task(api_as, member_with):
    creator = member_with(Role.MEMBER)

    response = api_as(creator).post("organizations/acme/projects", {"name": "Apollo"})

    assert response.status_code == 201
    project = Project.objects.get(name="Apollo")
    assert digest_event().payload["args"] == [project.pk]


def test_create_project__a_rollback_leaves_no_digest(organization, admin):
    with pytest.raises(RuntimeError), transaction.atomic():
        services.create_project(actor=admin, organization=organization, name="A")
        raise RuntimeError

    assert not OutboxEvent.objects.filter(event_type=TASK).exists()


def test_digest__mails_the_creator_and_keeps_the_counts(
    organization, admin, member_with, mailoutbox
):
    member_with(Role.VIEWER)
    ProjectFactory.create(organization=organization, name="Older")

    services.create_project(actor=admin, organization=organization, name="Apollo")
    drain()

    result = send_project_welcome_digest.get_result(str(digest_event().uuid))
    assert result.status == TaskResultStatus.SUCCESSFUL
    assert result.return_value == {"sent": 1, "members": 2, "projects": 2}
    [digest] = [mail for mail in mailoutbox if mail.to == [admin.email]]
    assert digest.subject == "Your project Apollo is ready in Acme"
    assert "Acme has 2 members and 2 projects." in digest.body
    assert digest.extra_headers["Message-ID"] == message_id(digest_event().uuid)


def test_digest__of_a_deleted_project_sends_nothing(organization, admin, mailoutbox):
    project = services.create_project(
        actor=admin, organization=organization, name="Apollo"
    )
    project.delete()

    drain()

    result = send_project_welcome_digest.get_result(str(digest_event().uuid))
    assert result.return_value == {"sent": 0}
    assert not [mail for mail in mailoutbox if mail.to == [admin.email]]
