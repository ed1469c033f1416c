import pytest
from django.core.management import call_command

from organizations.models import Invitation, Organization
from outbox.testing import drain

pytestmark = [pytest.mark.django_db, pytest.mark.sqlite]


def test_seed_demo__publishes_events_the_worker_turns_into_email(mailoutbox, capsys):
    call_command("seed_demo")
    call_command("seed_demo")

    assert list(Organization.objects.values_list("slug", flat=True)) == [
        "demo-1",
        "demo-2",
    ]
    assert Invitation.objects.count() == 6
    assert "12 events are pending (2 of them tasks)" in capsys.readouterr().out
    assert drain().completed == 12
    assert sorted({mail.to[0] for mail in mailoutbox}) == [
        "alice@example.com",
        "bob@example.com",
        "carol@example.com",
        "demo-admin@example.com",
    ]
