"""System checks of the project's own settings, those Django does not check."""

from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, register


# A deploy check, as Django's own security checks are: `check --deploy` before
# a release refuses the URL, while a local run with debug off on
# http://localhost (the test suite's, and the workers it starts) still starts.
@register(Tags.security, deploy=True)
def check_site_url(**kwargs: Any) -> list[CheckMessage]:
    """Refuse a SITE_URL that is not https:// outside debug."""
    if settings.DEBUG:
        return []
    site_url = settings.SITE_URL
    parts = urlsplit(site_url)
    if parts.scheme == "https" and parts.netloc:
        return []
    return [
        Error(
            f"settings.SITE_URL (environment variable DJANGO_SITE_URL) is "
            f"{site_url!r}: outside debug it must be an https:// URL, because "
            "the invitation links in emails lead to a page that sends their "
            "token back, which plain HTTP exposes on the way.",
            hint="Set DJANGO_SITE_URL=https://your.host.example",
            id="config.E001",
        )
    ]
