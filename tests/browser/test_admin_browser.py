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


@pytest.mark.django_db(transaction=True)
def test_operator__sees_the_last_hour_and_retries_a_group_of_dead_letters(
    page, live_server, django_user_model, run_group_migration
) -> None:
    from django.contrib.auth.models import Group
    from django.utils import timezone

    from outbox.models import OutboxActivity

    operator = django_user_model.objects.create_user(
        email="operator@example.com", password=PASSWORD, is_staff=True
    )
    # An earlier transactional test's flush took the group: see tests/conftest.py.
    operator.groups.add(Group.objects.get(name=run_group_migration()))
    minute = timezone.now().replace(second=0, microsecond=0)
    OutboxActivity.objects.create(minute=minute, completed=40, failed=2, ready=15)
    timeouts = OutboxEventFactory.create_batch(
        2,
        failed=True,
        last_error="TimeoutError: timed out after 30 s",
        error_cause="TimeoutError: timed out after <n> s",
    )
    refused = OutboxEventFactory.create(failed=True)

    page.goto(f"{live_server.url}/admin/login/?next=/admin/outbox/outboxevent/")
    page.fill("#id_username", "operator@example.com")
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    chart = page.locator("#outbox-activity svg.outbox-chart")
    expect(chart).to_be_visible()
    expect(chart.locator("g.outbox-chart-minute")).to_have_count(60)
    expect(page.locator("#outbox-activity figcaption")).to_contain_text("(40)")
    box = chart.bounding_box()
    assert box is not None and box["width"] > 300 and box["height"] > 100

    page.click("a.outbox-dead-letters")
    groups = page.locator("#outbox-failure-groups tr.outbox-failure-group")
    expect(groups).to_have_count(2)
    timeout_group = groups.filter(has_text="TimeoutError")
    expect(timeout_group).to_contain_text("timed out after <n> s")
    timeout_group.locator("a.outbox-group-retry").click()
    page.click("input[type=submit][value='Yes, retry 2 events']")

    expect(page.locator("ul.messagelist")).to_contain_text("Retried 2 events.")
    statuses = {event.pk: event.status for event in OutboxEvent.objects.all()}
    assert [statuses[event.pk] for event in timeouts] == [Status.PENDING] * 2
    assert statuses[refused.pk] == Status.FAILED
