from datetime import timedelta

import pytest
from django.db import IntegrityError, transaction
from django.utils import timezone

from organizations.models import Role
from tests.factories import (
    AuditEntryFactory,
    InvitationFactory,
    MembershipFactory,
    OrganizationFactory,
    ProjectFactory,
    UserFactory,
)

pytestmark = [pytest.mark.django_db, pytest.mark.sqlite]


def test_factories__build_valid_rows() -> None:
    entry = AuditEntryFactory.create(metadata={"when": timezone.now()})
    invitation = InvitationFactory.create()
    membership = MembershipFactory.create(role=Role.ADMIN)
    project = ProjectFactory.create()

    assert entry.pk and invitation.pk and membership.pk and project.pk
    assert str(entry) == f"project.created project:{entry.subject_id}"
    assert str(membership).endswith("as admin")
    assert str(project) == project.name
    assert str(invitation.organization) in str(invitation)


def test_organization__slug_is_unique() -> None:
    OrganizationFactory.create(slug="acme")

    with pytest.raises(IntegrityError):
        OrganizationFactory.create(slug="acme")


def test_organization__slug_cannot_be_empty() -> None:
    with pytest.raises(IntegrityError):
        OrganizationFactory.create(slug="")


def test_membership__is_unique_per_user_and_organization() -> None:
    membership = MembershipFactory.create()

    with pytest.raises(IntegrityError):
        MembershipFactory.create(
            user=membership.user, organization=membership.organization
        )


def test_membership__same_user_may_join_two_organizations() -> None:
    membership = MembershipFactory.create()

    MembershipFactory.create(user=membership.user)

    assert membership.user.memberships.count() == 2


@pytest.mark.parametrize("factory", [MembershipFactory, InvitationFactory])
def test_role__outside_the_choices_is_refused_by_the_database(factory) -> None:
    with pytest.raises(IntegrityError):
        factory.create(role="owner")


def test_invitation__cannot_be_both_accepted_and_revoked() -> None:
    now = timezone.now()

    with pytest.raises(IntegrityError):
        InvitationFactory.create(accepted_at=now, revoked_at=now)


def test_invitation__must_expire_after_it_was_created() -> None:
    with pytest.raises(IntegrityError):
        InvitationFactory.create(expires_at=timezone.now() - timedelta(seconds=1))


def test_invitation__one_open_invitation_per_email_and_organization() -> None:
    first = InvitationFactory.create(email="new@example.com")

    with pytest.raises(IntegrityError), transaction.atomic():
        InvitationFactory.create(
            organization=first.organization, email="NEW@example.com"
        )

    first.revoked_at = timezone.now()
    first.save(update_fields=["revoked_at"])
    second = InvitationFactory.create(
        organization=first.organization, email="new@example.com"
    )
    assert second.pk != first.pk


def test_invitation__same_email_may_be_invited_by_two_organizations() -> None:
    InvitationFactory.create(email="both@example.com")
    InvitationFactory.create(email="both@example.com")


def test_project__name_is_unique_per_organization_ignoring_case() -> None:
    project = ProjectFactory.create(name="Apollo")
    ProjectFactory.create(name="Apollo")  # another organization

    with pytest.raises(IntegrityError):
        ProjectFactory.create(organization=project.organization, name="apollo")


def test_project__name_cannot_be_empty() -> None:
    with pytest.raises(IntegrityError):
        ProjectFactory.create(name="")


def test_audit_entry__action_cannot_be_empty() -> None:
    with pytest.raises(IntegrityError):
        AuditEntryFactory.create(action="")


def test_deleting_a_user__keeps_what_they_created_and_did() -> None:
    author = UserFactory.create()
    project = ProjectFactory.create(created_by=author)
    entry = AuditEntryFactory.create(actor=author, organization=project.organization)

    author.delete()

    project.refresh_from_db()
    entry.refresh_from_db()
    assert project.created_by is None
    assert entry.actor is None
