"""Invariant 3 under load: parallel claimers handle every event exactly once."""

import threading
from collections import Counter, defaultdict

import pytest
from django.db import connection

from outbox import NewEvent, publish_many
from outbox.models import OutboxEvent, Status
from outbox.worker import Worker
from tests.outbox_app.models import SideEffect

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

EVENTS = 2000
KEYS = 20
WORKERS = 4


def test_four_claimers__handle_every_event_exactly_once(register_handler):
    calls: Counter[int] = Counter()
    per_key: defaultdict[str, list[int]] = defaultdict(list)
    lock = threading.Lock()

    def handle(event: OutboxEvent) -> None:
        with lock:
            calls[event.pk] += 1
            if event.key:
                per_key[event.key].append(event.payload["n"])
        SideEffect.objects.create(event_uuid=event.uuid)

    register_handler("load", handle)
    publish_many(
        [
            NewEvent("load", {"n": n}, key=f"k{n % KEYS}" if n % 2 else None)
            for n in range(EVENTS)
        ]
    )
    errors: list[BaseException] = []
    lost: list[int] = []

    def work(number: int) -> None:
        worker = Worker(worker_id=f"w{number}", batch_size=16)
        idle = 0
        try:
            while idle < 20:
                result = worker.run_once()
                lost.append(result.lost)
                idle = idle + 1 if not result.claimed else 0
        except BaseException as error:
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)

    assert errors == []
    assert len(calls) == EVENTS
    assert set(calls.values()) == {1}
    assert SideEffect.objects.count() == EVENTS
    # One claim per event: no claimer took a row another held and overwrote
    # its lease (which would count a second attempt and lose the first).
    assert sum(lost) == 0
    assert set(OutboxEvent.objects.values_list("status", "attempts")) == {
        (Status.COMPLETED, 1)
    }
    for key, numbers in per_key.items():
        assert numbers == sorted(numbers), f"key {key} ran out of order"
    busy_workers = OutboxEvent.objects.values("locked_by").distinct().count()
    assert busy_workers > 1
