"""factory-boy factories for every model of the reference application."""

from datetime import timedelta
from typing import Any

import factory
from django.utils import timezone

from organizations.models import (
    AuditEntry,
    Invitation,
    Membership,
    Organization,
    Project,
    Role,
)
from users.models import User


class UserFactory(factory.django.DjangoModelFactory[User]):
    email = factory.Sequence(lambda n: f"person{n}@example.com")
    full_name = factory.Faker("name")
    password = factory.django.Password("correct horse battery staple")

    class Meta:
        model = User
        skip_postgeneration_save = True


class OrganizationFactory(factory.django.DjangoModelFactory[Organization]):
    name = factory.Sequence(lambda n: f"Organization {n}")
    slug = factory.Sequence(lambda n: f"org-{n}")

    class Meta:
        model = Organization


class MembershipFactory(factory.django.DjangoModelFactory[Membership]):
    user = factory.SubFactory(UserFactory)
    organization = factory.SubFactory(OrganizationFactory)
    role = Role.MEMBER

    class Meta:
        model = Membership


def _in_a_week(_: Any) -> Any:
    return timezone.now() + timedelta(days=7)


class InvitationFactory(factory.django.DjangoModelFactory[Invitation]):
    organization = factory.SubFactory(OrganizationFactory)
    email = factory.Sequence(lambda n: f"invitee{n}@example.com")
    role = Role.MEMBER
    # An admin of the organization: an invitation stands only while its
    # sender may still invite.
    invited_by = factory.LazyAttribute(
        lambda invitation: (
            MembershipFactory.create(
                organization=invitation.organization, role=Role.ADMIN
            ).user
        )
    )
    expires_at = factory.LazyAttribute(_in_a_week)

    class Meta:
        model = Invitation

    class Params:
        accepted = factory.Trait(accepted_at=factory.LazyFunction(timezone.now))
        revoked = factory.Trait(revoked_at=factory.LazyFunction(timezone.now))


class ProjectFactory(factory.django.DjangoModelFactory[Project]):
    organization = factory.SubFactory(OrganizationFactory)
    name = factory.Sequence(lambda n: f"Project {n}")
    created_by = factory.SubFactory(UserFactory)

    class Meta:
        model = Project


class AuditEntryFactory(factory.django.DjangoModelFactory[AuditEntry]):
    organization = factory.SubFactory(OrganizationFactory)
    actor = factory.SubFactory(UserFactory)
    action = "project.created"
    subject_type = "project"
    subject_id = factory.Sequence(str)
    metadata = factory.LazyFunction(dict)

    class Meta:
        model = AuditEntry
