from typing import Any

from django.core.management.base import BaseCommand
from django.db import transaction

from organizations import services
from organizations.models import Organization
from outbox.models import OutboxEvent, Status
from outbox.registry import TASK_EVENT_PREFIX
from users.models import User

DEMO_ADMIN = "demo-admin@example.com"
INVITEES = ("alice@example.com", "bob@example.com", "carol@example.com")


class Command(BaseCommand):
    help = (
        "Create a demo organization, invite a few people and add a project, "
        "through the same services the API uses; the worker then sends the emails."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        with transaction.atomic():
            admin = User.objects.filter(email=DEMO_ADMIN).first()
            if admin is None:
                admin = User.objects.create_user(DEMO_ADMIN, full_name="Demo Admin")
            number = Organization.objects.filter(slug__startswith="demo-").count() + 1
            organization = services.create_organization(
                actor=admin, name=f"Demo {number}", slug=f"demo-{number}"
            )
            for email in INVITEES:
                services.invite_member(
                    actor=admin, organization=organization, email=email, role="member"
                )
            services.create_project(
                actor=admin, organization=organization, name="Launch"
            )
        pending = OutboxEvent.objects.filter(status=Status.PENDING)
        tasks = pending.filter(event_type__startswith=TASK_EVENT_PREFIX).count()
        self.stdout.write(
            f"Created {organization.name} ({organization.slug}): invited "
            f"{len(INVITEES)} people and added a project. {pending.count()} events "
            f"are pending ({tasks} of them {'a task' if tasks == 1 else 'tasks'}); "
            "start the worker to send their emails."
        )
