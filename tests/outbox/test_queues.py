"""Queues: publish(queue=...), Worker(queues=...) and run_outbox_worker --queue.

Also the claim's timestamps (started_at, last_attempted_at) and the
traceback each failed attempt keeps, which django.tasks results show and
which any event has.
"""

import re
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.db import transaction

from outbox import publish
from outbox.models import TRACEBACK_LIMIT, OutboxEvent, Status
from outbox.testing import drain
from outbox.worker import Worker

pytestmark = [pytest.mark.sqlite, pytest.mark.django_db]


def test_publish__puts_an_event_in_the_default_queue_unless_told() -> None:
    plain = publish("x", {})
    reports = publish("x", {}, queue="reports")

    assert plain.queue_name == "default"
    assert OutboxEvent.objects.get(pk=reports.pk).queue_name == "reports"


@pytest.mark.parametrize(
    ("queue", "error", "named"),
    [
        ("q" * 201, ValueError, "publish(queue=...) is 201 characters long"),
        ("", ValueError, "publish(queue=...) must not be empty"),
        (" ", ValueError, "publish(queue=...) must not be empty"),
        (" a", ValueError, "publish(queue=...) ' a' has spaces around it"),
        ("a\x00", ValueError, "publish(queue=...) contains"),
        (7, TypeError, "publish(queue=...) must be a string"),
    ],
)
def test_publish__refuses_a_queue_name_the_column_cannot_hold(
    queue: object, error: type[Exception], named: str
) -> None:
    with pytest.raises(error, match=re.escape(named)):
        publish("x", {}, queue=queue)  # type: ignore[arg-type]

    assert not OutboxEvent.objects.exists()


def test_worker__with_queues_claims_only_theirs(register_handler) -> None:
    register_handler("x", lambda event: None)
    events = {name: publish("x", {}, queue=name) for name in ("a", "b", "c")}

    Worker(worker_id="ab", queues=["b", "a"]).run(drain=True)

    statuses = {
        name: OutboxEvent.objects.get(pk=event.pk).status
        for name, event in events.items()
    }
    assert statuses == {
        "a": Status.COMPLETED,
        "b": Status.COMPLETED,
        "c": Status.PENDING,
    }


def test_drain__with_queues_handles_only_theirs(register_handler) -> None:
    register_handler("x", lambda event: None)
    mine = publish("x", {}, queue="mine")
    other = publish("x", {})

    assert drain(queues=["mine"]).completed == 1

    assert OutboxEvent.objects.get(pk=mine.pk).status == Status.COMPLETED
    assert OutboxEvent.objects.get(pk=other.pk).status == Status.PENDING


def test_worker__refuses_a_bad_queue_name() -> None:
    with pytest.raises(ValueError, match="queues is 201 characters long"):
        Worker(queues=["q" * 201])


@pytest.mark.parametrize("queue", ["", "q" * 201])
def test_command__refuses_a_bad_queue(queue: str) -> None:
    with pytest.raises(CommandError, match="--queue"):
        call_command("run_outbox_worker", "--queue", queue, "--drain")


def test_claim__stamps_the_first_start_and_the_latest_attempt(register_handler):
    register_handler("x", lambda event: None)
    event = publish("x", {})
    lease = timedelta(seconds=30)

    with transaction.atomic():
        [first] = OutboxEvent.objects.claim(worker_id="w", limit=1, lease=lease)
    assert first.started_at is not None
    assert first.last_attempted_at is not None
    OutboxEvent.objects.filter(pk=event.pk).update(
        status=Status.PENDING, started_at=first.started_at - timedelta(hours=1)
    )
    with transaction.atomic():
        [second] = OutboxEvent.objects.claim(worker_id="w", limit=1, lease=lease)

    assert first.last_attempted_at == first.started_at
    assert second.started_at == first.started_at - timedelta(hours=1)
    assert second.last_attempted_at is not None
    assert second.last_attempted_at >= first.last_attempted_at


def test_release__forgets_the_start_of_an_event_never_started(register_handler):
    from outbox import statements

    register_handler("x", lambda event: None)
    event = publish("x", {})
    with transaction.atomic():
        [claimed] = OutboxEvent.objects.claim(
            worker_id="w", limit=1, lease=timedelta(seconds=30)
        )

    statements.release([(claimed.pk, claimed.lease_token or 0)], using="default")

    event.refresh_from_db()
    assert (event.status, event.attempts, event.started_at) == (
        Status.PENDING,
        0,
        None,
    )


def test_failed_attempt__keeps_its_traceback_redacted_and_truncated(
    register_handler,
) -> None:
    def fails(event: OutboxEvent) -> None:
        raise ConnectionError("x" * 5000 + " refused for alice@example.com")

    register_handler("x", fails)
    event = publish("x", {}, max_attempts=1)

    drain()

    event.refresh_from_db()
    traceback = event.history[-1]["traceback"]
    assert len(traceback) == TRACEBACK_LIMIT
    assert traceback.startswith("…")
    assert traceback.endswith("xxx refused for <email>\n")
    assert "alice@example.com" not in traceback


def test_claim_of_several_queues__takes_the_oldest_across_them(register_handler):
    register_handler("x", lambda event: None)
    published = [publish("x", {}, queue=name) for name in ("a", "b", "c", "a", "b")]

    with transaction.atomic():
        batch = OutboxEvent.objects.claim(
            worker_id="w", limit=3, lease=timedelta(seconds=30), queues=["b", "a"]
        )

    assert [event.pk for event in batch] == [
        published[0].pk,
        published[1].pk,
        published[3].pk,
    ]
    left = OutboxEvent.objects.filter(status=Status.PENDING).order_by("id")
    assert [event.queue_name for event in left] == ["c", "b"]
