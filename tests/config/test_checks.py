"""The project's own system checks refuse settings unfit for production."""

import pytest
from django.test import override_settings

from config.checks import check_site_url


@pytest.mark.parametrize(
    "site_url",
    ["http://example.com", "example.com", "https://", "ftp://example.com"],
)
def test_check_site_url__refuses_anything_but_https_outside_debug(site_url) -> None:
    with override_settings(DEBUG=False, SITE_URL=site_url):
        [error] = check_site_url()

    assert error.id == "config.E001"
    assert "SITE_URL" in error.msg
    assert "DJANGO_SITE_URL" in error.msg
    assert repr(site_url) in error.msg


def test_check_site_url__accepts_https_outside_debug() -> None:
    with override_settings(DEBUG=False, SITE_URL="https://example.com"):
        assert check_site_url() == []


def test_check_site_url__allows_http_in_debug() -> None:
    with override_settings(DEBUG=True, SITE_URL="http://localhost:8000"):
        assert check_site_url() == []
