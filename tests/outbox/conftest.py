from collections.abc import Iterator

import pytest
from django.contrib.auth.models import Group, Permission
from django.test import Client, override_settings

from tests.outbox.worker_process import WorkerProcess

#: Settings that keep the claimer's timings short enough for tests.
FAST = {"BACKOFF_BASE_MS": 1, "BACKOFF_CAP_MS": 5, "STUCK_TIMEOUT_MS": 200}


@pytest.fixture
def fast_outbox():
    """Retry at once and let leases expire in 200 ms."""
    with override_settings(OUTBOX=FAST):
        yield FAST


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    """Start workers with workers.append(...); kill any left at the end."""
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.kill()


@pytest.fixture
def make_staff(django_user_model, django_username_field):
    """Return a factory of logged-in clients, one per staff member."""

    def make(name: str, *, permissions=(), groups=()):
        user = django_user_model.objects.create_user(
            **{django_username_field: f"{name}@example.com"},
            password="a-long-password-1",
            is_staff=True,
        )
        user.user_permissions.add(
            *Permission.objects.filter(
                content_type__app_label="outbox", codename__in=permissions
            )
        )
        user.groups.add(*Group.objects.filter(name__in=groups))
        client = Client()
        client.force_login(user)
        return client

    return make


@pytest.fixture
def viewer(make_staff):
    """A staff member who may only look at events and workers."""
    return make_staff("viewer", permissions=("view_outboxevent", "view_outboxworker"))


@pytest.fixture
def operator(make_staff, run_group_migration):
    """A member of the group that migration 0007 creates."""
    return make_staff("operator", groups=(run_group_migration(),))
