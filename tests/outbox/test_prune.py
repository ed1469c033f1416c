"""Retention: outbox/pruning.py, prune_outbox and the worker's schedule."""

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.test import override_settings
from django.utils import timezone

from outbox import PermanentFailure, publish
from outbox.models import OutboxEvent, Status
from outbox.operations import discard_events, retry_events
from outbox.pruning import parse_duration, prune
from outbox.worker import Worker
from tests.outbox.factories import OutboxEventFactory

pytestmark = [pytest.mark.django_db, pytest.mark.sqlite]

DAYS_AGO_10 = timedelta(days=10)


def aged(event: OutboxEvent, age: timedelta = DAYS_AGO_10) -> OutboxEvent:
    """Backdate the event's creation, and its completion or failure, by age."""
    then = timezone.now() - age
    OutboxEvent.objects.filter(pk=event.pk).update(
        created_at=then,
        completed_at=then if event.completed_at else None,
        failed_at=then if event.failed_at else None,
    )
    return event


@pytest.fixture
def mix() -> dict[str, OutboxEvent]:
    """One event of each kind, old and new, keyed by what it is.

    Created oldest first, as ids follow creation.
    """
    waited = aged(OutboxEventFactory.create(completed=True))
    OutboxEvent.objects.filter(pk=waited.pk).update(completed_at=timezone.now())
    return {
        "old_completed": aged(OutboxEventFactory.create(completed=True)),
        "old_failed": aged(OutboxEventFactory.create(failed=True)),
        "old_pending": aged(OutboxEventFactory.create()),
        "old_processing": aged(OutboxEventFactory.create(leased=True)),
        # Created long ago, completed just now (a backlog, retries): its
        # age counts from its completion.
        "old_completed_lately": waited,
        "new_completed": OutboxEventFactory.create(completed=True),
        "new_failed": OutboxEventFactory.create(failed=True),
    }


def remaining(mix: dict[str, OutboxEvent]) -> set[str]:
    left = set(OutboxEvent.objects.values_list("pk", flat=True))
    return {name for name, event in mix.items() if event.pk in left}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", timedelta(minutes=30)),
        ("12h", timedelta(hours=12)),
        ("7d", timedelta(days=7)),
        ("45s", timedelta(seconds=45)),
    ],
)
def test_parse_duration__reads_seconds_minutes_hours_and_days(text, expected) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["7", "d", "7w", "-1d", "0d", "1.5h", ""])
def test_parse_duration__rejects_anything_else(text) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


def test_prune__deletes_only_old_completed_events(mix) -> None:
    result = prune(older_than=timedelta(days=7))

    assert (result.completed, result.failed) == (1, 0)
    assert remaining(mix) == set(mix) - {"old_completed"}


def test_prune__with_failed_also_deletes_old_failed_events(mix) -> None:
    result = prune(older_than=timedelta(days=7), include_failed=True)

    assert (result.completed, result.failed) == (1, 1)
    assert remaining(mix) == {
        "new_completed",
        "new_failed",
        "old_pending",
        "old_processing",
        "old_completed_lately",
    }


def test_prune__works_in_batches_and_reports_each() -> None:
    for _ in range(5):
        aged(OutboxEventFactory.create(completed=True))
    seen: list[tuple[str, int, int]] = []

    result = prune(
        older_than=timedelta(days=1),
        batch_size=2,
        progress=lambda *batch: seen.append(batch),
    )

    assert seen == [("completed", 2, 2), ("completed", 2, 4), ("completed", 1, 5)]
    assert (result.completed, result.batches) == (5, 3)
    assert not OutboxEvent.objects.exists()


def test_prune__max_batches_bounds_one_call() -> None:
    for _ in range(5):
        aged(OutboxEventFactory.create(completed=True))

    result = prune(older_than=timedelta(days=1), batch_size=2, max_batches=1)

    assert result.completed == 2
    assert OutboxEvent.objects.count() == 3


def test_command__prints_progress_and_a_summary(mix) -> None:
    out = StringIO()

    call_command("prune_outbox", "--older-than", "7d", "--include-failed", stdout=out)

    text = out.getvalue()
    assert "Deleted 1 completed events (1 so far)." in text
    assert "Deleted 1 failed events (2 so far)." in text
    assert "Deleted 1 completed and 1 failed events older than" in text
    assert remaining(mix) == {
        "new_completed",
        "new_failed",
        "old_pending",
        "old_processing",
        "old_completed_lately",
    }


def test_command__dry_run_deletes_nothing(mix) -> None:
    out = StringIO()

    call_command(
        "prune_outbox",
        "--older-than",
        "7d",
        "--dry-run",
        "--include-failed",
        stdout=out,
    )

    assert "Would delete 1 completed events older than" in out.getvalue()
    assert "Would delete 1 failed events older than" in out.getvalue()
    assert remaining(mix) == set(mix)


def test_prune__stops_at_the_first_event_created_since_the_cutoff() -> None:
    # Ids follow creation; an event whose id came after a newer one's but
    # whose creation is dated before the cutoff (its transaction began
    # first) waits until the events numbered before it are old too.
    old = aged(OutboxEventFactory.create(completed=True))
    new = OutboxEventFactory.create(completed=True)
    late = aged(OutboxEventFactory.create(completed=True))

    first = prune(older_than=timedelta(days=7))
    aged(new)
    second = prune(older_than=timedelta(days=7))

    assert (first.completed, second.completed) == (1, 2)
    assert not OutboxEvent.objects.filter(pk__in=[old.pk, new.pk, late.pk]).exists()


@pytest.mark.parametrize(
    ("arguments", "option"),
    [
        (["--older-than", "7x"], "--older-than"),
        (["--older-than", "7d", "--batch-size", "0"], "--batch-size"),
        ([], "--older-than"),
    ],
)
def test_command__names_the_option_it_cannot_read(arguments, option) -> None:
    with pytest.raises(CommandError, match=option):
        call_command("prune_outbox", *arguments)


@pytest.fixture
def clock(monkeypatch):
    """The maintenance's monotonic clock, moved by hand."""
    now = [1000.0]
    monkeypatch.setattr("outbox.maintenance.time.monotonic", lambda: now[0])
    return now


def test_worker__prunes_once_a_minute_when_the_setting_is_on(mix, clock) -> None:
    with override_settings(OUTBOX={"PRUNE_AFTER_DAYS": "7"}):
        maintenance = Worker(worker_id="pruner").maintenance
        clock[0] += 60
        maintenance.run_due()
        assert remaining(mix) == set(mix) - {"old_completed"}
        later = aged(mix["new_completed"])  # the next oldest comes of age
        clock[0] += 59
        maintenance.run_due()  # not due again yet
        assert OutboxEvent.objects.filter(pk=later.pk).exists()
        clock[0] += 2
        maintenance.run_due()

    assert not OutboxEvent.objects.filter(pk=later.pk).exists()


def test_worker__does_not_prune_by_default(mix, clock) -> None:
    with override_settings(OUTBOX={}):
        maintenance = Worker(worker_id="pruner").maintenance
        clock[0] += 60
        maintenance.run_due()

    assert "old_completed" in remaining(mix)
    assert Status.COMPLETED in OutboxEvent.objects.values_list("status", flat=True)


def test_prune__ages_failed_events_from_when_they_failed() -> None:
    # Created long ago, retried by an operator, failed again just now.
    failed_again = aged(OutboxEventFactory.create(failed=True), timedelta(days=30))
    OutboxEvent.objects.filter(pk=failed_again.pk).update(failed_at=timezone.now())
    aged(OutboxEventFactory.create(failed=True))  # failed ten days ago
    # Failed before failed_at existed: aged by its creation.
    from_before = aged(OutboxEventFactory.create(failed=True))
    OutboxEvent.objects.filter(pk=from_before.pk).update(failed_at=None)

    result = prune(older_than=timedelta(days=7), include_failed=True)

    assert result.failed == 2
    assert list(OutboxEvent.objects.values_list("pk", flat=True)) == [failed_again.pk]


def test_failed_at__is_set_when_an_event_fails_or_is_discarded_cleared_by_a_retry(
    register_handler,
) -> None:
    def give_up(event: OutboxEvent) -> None:
        raise PermanentFailure("no")

    register_handler("gives.up", give_up)
    event = publish("gives.up", {})
    Worker(worker_id="w").run_once()
    event.refresh_from_db()
    assert event.status == Status.FAILED
    assert event.failed_at is not None

    retry_events(OutboxEvent.objects.filter(pk=event.pk), actor="op")
    event.refresh_from_db()
    assert (event.status, event.failed_at) == (Status.PENDING, None)

    discard_events(OutboxEvent.objects.filter(pk=event.pk), actor="op")
    event.refresh_from_db()
    assert event.status == Status.FAILED
    assert event.failed_at is not None


def test_worker__prunes_failed_events_only_with_their_own_setting(mix, clock) -> None:
    with override_settings(OUTBOX={"PRUNE_FAILED_AFTER_DAYS": "7"}):
        maintenance = Worker(worker_id="pruner").maintenance
        clock[0] += 60
        maintenance.run_due()

    assert remaining(mix) == set(mix) - {"old_failed"}


@pytest.mark.parametrize(
    ("completed_days", "failed_days", "pruned"),
    [("30", "7", "old_failed"), ("7", "30", "old_completed")],
)
def test_worker__prunes_completed_and_failed_events_each_by_its_age(
    mix, clock, completed_days, failed_days, pruned
) -> None:
    settings = {
        "PRUNE_AFTER_DAYS": completed_days,
        "PRUNE_FAILED_AFTER_DAYS": failed_days,
    }
    with override_settings(OUTBOX=settings):
        maintenance = Worker(worker_id="pruner").maintenance
        clock[0] += 60
        maintenance.run_due()

    assert remaining(mix) == set(mix) - {pruned}


def test_setting__rejects_a_bad_prune_after_days() -> None:
    from outbox.checks import check_outbox_settings

    with override_settings(OUTBOX={"PRUNE_AFTER_DAYS": "a week"}):
        [error] = check_outbox_settings()

    assert "OUTBOX_PRUNE_AFTER_DAYS" in error.msg
