"""Invariant 7: events of one key run one at a time, in publish order."""

import threading
import time
from collections.abc import Callable

import pytest
from django.db import connection, transaction

from outbox import PermanentFailure, publish
from outbox.models import OutboxEvent, Status
from outbox.testing import drain
from outbox.worker import Worker
from tests.outbox.sessions import backend_pid, waiting_for_a_lock
from tests.outbox.worker_process import wait_until


@pytest.fixture
def handled(register_handler) -> list[str]:
    """Register 'step', whose handler records payload['name'] in order."""
    seen: list[str] = []

    def step(event: OutboxEvent) -> None:
        seen.append(event.payload["name"])

    register_handler("step", step)
    return seen


def drain_until_done(*, rounds: int = 200) -> None:
    worker = Worker()
    for _ in range(rounds):
        worker.run_once()
        if not OutboxEvent.objects.filter(
            status__in=("pending", "processing")
        ).exists():
            return
        time.sleep(0.005)
    raise AssertionError("events left unfinished")


@pytest.mark.sqlite
@pytest.mark.django_db
def test_key__an_event_waiting_for_its_retry_holds_back_the_rest(
    register_handler, fast_outbox
):
    seen: list[str] = []

    def fails_once(event: OutboxEvent) -> None:
        seen.append(event.payload["name"])
        if seen.count(event.payload["name"]) == 1 and event.payload["name"] == "a":
            raise ConnectionError("first try fails")

    register_handler("step", fails_once)
    for name in "abc":
        publish("step", {"name": name}, key="org:1")

    first = Worker(batch_size=10).run_once()
    assert (first.claimed, first.retried) == (1, 1)  # b and c wait behind a
    drain_until_done()

    assert seen == ["a", "a", "b", "c"]


@pytest.mark.sqlite
@pytest.mark.django_db
def test_key__a_failed_event_lets_the_next_one_run(register_handler):
    seen: list[str] = []

    def step(event: OutboxEvent) -> None:
        seen.append(event.payload["name"])
        if event.payload["name"] == "a":
            raise PermanentFailure("bad")

    register_handler("step", step)
    for name in "ab":
        publish("step", {"name": name}, key="org:1")

    drain()

    assert seen == ["a", "b"]
    statuses = OutboxEvent.objects.order_by("id").values_list("status", flat=True)
    assert list(statuses) == [Status.FAILED, Status.COMPLETED]


@pytest.mark.sqlite
@pytest.mark.django_db
def test_key__different_keys_and_unkeyed_events_run_in_one_batch(handled):
    publish("step", {"name": "a1"}, key="a")
    publish("step", {"name": "a2"}, key="a")
    publish("step", {"name": "b1"}, key="b")
    publish("step", {"name": "free"})

    result = Worker(batch_size=10).run_once()

    assert result.completed == 3
    assert handled == ["a1", "b1", "free"]
    drain()
    assert handled[-1] == "a2"


@pytest.mark.slow
@pytest.mark.django_db
def test_key__busy_keys_do_not_hold_back_everyone_else(handled):
    for _ in range(200):
        for key in ("busy-1", "busy-2", "busy-3"):
            publish("step", {"name": key}, key=key)
    for number in range(40):
        publish("step", {"name": "other"}, key=f"quiet-{number}")
        publish("step", {"name": "other"})
    worker = Worker(batch_size=32)

    for _ in range(3):
        worker.run_once()

    # Each batch of 32 takes the 3 busy keys' heads and 29 quiet events, so
    # the 80 quiet events are done after three batches, not after 600.
    assert handled.count("other") == 80
    assert len(handled) == 3 * 3 + 80


def in_thread(function: Callable[[], None]) -> threading.Thread:
    def run() -> None:
        try:
            function()
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.django_db(transaction=True)
def test_key__publishers_committing_in_reverse_order_keep_publish_order(handled):
    """Two transactions publish for one key; the second tries to commit first."""
    first_published = threading.Event()
    release_first = threading.Event()
    order: list[str] = []

    def first() -> None:
        with transaction.atomic():
            publish("step", {"name": "first"}, key="org:1")
            first_published.set()
            release_first.wait(5)
            order.append("first committed")

    second_backend: list[int] = []

    def second() -> None:
        with transaction.atomic():
            second_backend.append(backend_pid())
            publish("step", {"name": "second"}, key="org:1")
        order.append("second committed")

    threads = [in_thread(first)]
    try:
        assert first_published.wait(5)
        threads.append(in_thread(second))
        # The second publisher waits for the key's lock; were there no lock,
        # it would commit at once, and the checks below say what broke.
        wait_until(
            lambda: (
                bool(order)
                or (
                    bool(second_backend)
                    and waiting_for_a_lock(second_backend[0], locktype="advisory")
                )
            ),
            timeout=5,
        )
        Worker().run_once()
        assert handled == []  # nothing of the key ran ahead of the first
        assert order == []  # and the second waited, for the key's lock
    finally:
        release_first.set()
        for thread in threads:
            thread.join(5)
    drain_until_done()

    assert order == ["first committed", "second committed"]
    assert handled == ["first", "second"]


@pytest.mark.django_db(transaction=True)
def test_key__unkeyed_publishers_never_wait_for_a_keyed_transaction(handled):
    first_published = threading.Event()
    release_first = threading.Event()

    def keyed() -> None:
        with transaction.atomic():
            publish("step", {"name": "keyed"}, key="org:1")
            first_published.set()
            release_first.wait(5)

    thread = in_thread(keyed)
    try:
        assert first_published.wait(5)
        publish("step", {"name": "free"})
        Worker().run_once()
        assert handled == ["free"]
    finally:
        release_first.set()
        thread.join(5)
    drain_until_done()
    assert handled == ["free", "keyed"]


@pytest.mark.django_db(transaction=True)
def test_key__publisher_inside_its_transaction_while_the_head_finishes(
    register_handler,
):
    """The head completes while a publisher of its key is mid-transaction.

    The worker cannot see the new event yet; once it commits, it must still
    become claimable (the worker checks the key again on its next tick).
    """
    publishing = threading.Event()
    handler_done = threading.Event()
    seen: list[str] = []

    def step(event: OutboxEvent) -> None:
        seen.append(event.payload["name"])
        if event.payload["name"] == "head":
            # A publisher of the key is inside its transaction.
            assert publishing.wait(5)

    register_handler("step", step)
    publish("step", {"name": "head"}, key="org:1")

    def publisher() -> None:
        with transaction.atomic():
            publish("step", {"name": "next"}, key="org:1")
            publishing.set()
            handler_done.wait(5)

    thread = in_thread(publisher)
    worker = Worker()
    worker.run_once()  # completes the head while the key's lock is taken
    handler_done.set()
    thread.join(5)
    worker.run_once()

    assert seen == ["head", "next"]


@pytest.mark.sqlite
@pytest.mark.django_db
def test_key__an_orphaned_waiting_event_is_promoted_by_the_sweep(handled):
    """A worker died between finishing a key's head and re-checking the key."""
    head = publish("step", {"name": "head"}, key="org:1")
    orphan = publish("step", {"name": "orphan"}, key="org:1")
    OutboxEvent.objects.filter(pk=head.pk).update(status=Status.COMPLETED)
    assert not OutboxEvent.objects.ready().exists()

    promoted = Worker().promote_orphaned_keys()

    assert promoted == 1
    assert list(OutboxEvent.objects.ready()) == [orphan]
    drain()
    assert handled == ["orphan"]


@pytest.mark.django_db(transaction=True)
def test_key__a_busy_key_is_rechecked_even_after_other_keys_finish(register_handler):
    """The re-check of a key whose publisher was mid-transaction is not lost.

    Between the head of org:1 finishing (its publisher still inside its
    transaction) and that publisher committing, the worker finishes an event
    of another key; org:1 must still be re-checked afterwards.
    """
    publishing = threading.Event()
    release = threading.Event()
    seen: list[str] = []

    def step(event: OutboxEvent) -> None:
        seen.append(event.payload["name"])
        if event.payload["name"] == "head":
            assert publishing.wait(5)

    register_handler("step", step)
    publish("step", {"name": "head"}, key="org:1")

    def publisher() -> None:
        with transaction.atomic():
            publish("step", {"name": "next"}, key="org:1")
            publishing.set()
            release.wait(5)

    thread = in_thread(publisher)
    worker = Worker()
    worker.run_once()  # org:1's head finishes while its lock is taken
    publish("step", {"name": "other"}, key="org:2")
    worker.run_once()  # finishes org:2
    release.set()
    thread.join(5)
    worker.run_once()

    assert seen == ["head", "other", "next"]
