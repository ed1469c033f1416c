"""The operator's console in a real browser: Debian's Chromium via Playwright.

`make test` installs chromium (scripts/install-chromium). Without it this
test fails rather than skips: a console nobody has clicked through is not
known to work.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest
from django.db import connections
from playwright.sync_api import Page, expect, sync_playwright

from outbox.models import OutboxEvent, Status
from tests.outbox.factories import OutboxEventFactory

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PASSWORD = "a-long-password-1"

# A real browser: seconds to start.
pytestmark = pytest.mark.slow


@pytest.fixture
def page(monkeypatch) -> Iterator[Page]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: run scripts/install-chromium (make test does)"
        )
    # Playwright's sync API runs an event loop in this thread; the test's own
    # database calls are synchronous and safe.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(20_000)
            yield page
        finally:
            browser.close()
            # Queries made while Playwright's loop is active may get a
            # connection of their own; close it, or the test database cannot
            # be dropped at the end of the run.
            connections.close_all()


@pytest.mark.django_db(transaction=True)
def test_operator__filters_failed_events_and_retries_one(
    page, live_server, django_user_model
) -> None:
    from django.contrib.auth.models import Group

    operator = django_user_model.objects.create_user(
        email="operator@example.com", password=PASSWORD, is_staff=True
    )
    operator.groups.add(Group.objects.get(name="Outbox operators"))
    failed = OutboxEventFactory.create(failed=True, event_type="mail.send")
    other = OutboxEventFactory.create(failed=True, event_type="sms.send")
    OutboxEventFactory.create(completed=True)

    page.goto(f"{live_server.url}/admin/login/?next=/admin/outbox/outboxevent/")
    page.fill("#id_username", "operator@example.com")
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    expect(page.locator("#outbox-summary")).to_contain_text("Failed: 2")

    page.click("#changelist-filter >> text=Failed")
    expect(page.locator("#result_list tbody tr")).to_have_count(2)
    row = page.locator("#result_list tbody tr", has_text=str(failed.uuid))
    row.locator("input.action-select").check()
    page.select_option("select[name=action]", "retry_now")
    page.click("button[name=index]")

    expect(page.locator("ul.messagelist")).to_contain_text("Retried 1 event.")
    page.click("#changelist-filter >> text=Pending")
    expect(page.locator("#result_list")).to_contain_text(str(failed.uuid))
    expect(page.locator("#result_list")).to_contain_text("Pending")
    assert OutboxEvent.objects.get(pk=failed.pk).status == Status.PENDING
    assert OutboxEvent.objects.get(pk=other.pk).status == Status.FAILED
