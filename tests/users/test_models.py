import pytest
from django.contrib.auth import authenticate, get_user_model
from django.db import IntegrityError

from tests.factories import UserFactory
from users.models import User

pytestmark = [pytest.mark.django_db, pytest.mark.sqlite]


def test_auth_user_model__is_the_email_user() -> None:
    assert get_user_model() is User
    assert User.USERNAME_FIELD == "email"
    assert not hasattr(User, "username")


def test_create_user__normalizes_the_domain_and_hashes_the_password() -> None:
    user = User.objects.create_user("Ann@Example.COM", "s3cret-enough-pass")

    assert user.email == "Ann@example.com"
    assert user.password != "s3cret-enough-pass"
    assert user.check_password("s3cret-enough-pass")
    assert not user.is_staff


def test_create_user__without_email_is_refused() -> None:
    with pytest.raises(ValueError, match="email"):
        User.objects.create_user("", "whatever")


def test_create_superuser__has_every_flag() -> None:
    user = User.objects.create_superuser("root@example.com", "pw-root-example")

    assert user.is_staff
    assert user.is_superuser


def test_create_superuser__refuses_is_staff_false() -> None:
    with pytest.raises(ValueError, match="is_staff"):
        User.objects.create_superuser("root@example.com", "pw", is_staff=False)


def test_email__is_unique_ignoring_case() -> None:
    UserFactory.create(email="ann@example.com")

    with pytest.raises(IntegrityError):
        UserFactory.create(email="ANN@example.com")


def test_authenticate__logs_in_with_email_in_any_case() -> None:
    user = UserFactory.create(email="bob@example.com", password="a-long-password-1")

    assert authenticate(username="BOB@example.com", password="a-long-password-1") == (
        user
    )
    assert authenticate(username="bob@example.com", password="wrong") is None


def test_names__fall_back_to_the_email() -> None:
    named = UserFactory.build(email="c@example.com", full_name="Cleo Park")
    anonymous = UserFactory.build(email="d@example.com", full_name="")

    assert (named.get_full_name(), named.get_short_name()) == ("Cleo Park", "Cleo")
    assert anonymous.get_full_name() == anonymous.get_short_name() == "d@example.com"
    assert str(anonymous) == "d@example.com"


def test_clean__normalizes_the_email() -> None:
    user = User(email="eve@EXAMPLE.org")
    user.clean()
    assert user.email == "eve@example.org"
