"""run_outbox_worker --concurrency N: every invariant holds per event, N >= 8.

Real worker processes with real signals, as in test_worker_process.py. The
handlers log "start <uuid> <time>" and "end <uuid> <time>" lines to a file
(their external effect) and write a HandlerRun row (their database effect).
"""

import signal
import threading
from collections import Counter
from datetime import datetime, timedelta
from itertools import pairwise
from pathlib import Path

import pytest
from django.db import connection
from django.db.models.functions import Now

from outbox import publish
from outbox.models import OutboxEvent, Status
from outbox.recording import record
from outbox.worker import Worker
from tests.outbox.sessions import InThread
from tests.outbox.worker_process import WorkerProcess, wait_until
from tests.outbox_app.models import HandlerRun, SideEffect

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

SLOTS = "8"


def start(workers: list[WorkerProcess], *arguments: str) -> WorkerProcess:
    worker = WorkerProcess("--concurrency", SLOTS, *arguments)
    workers.append(worker)
    return worker


def spans(log: Path) -> dict[str, list[tuple[float, float | None]]]:
    """Return each event's runs as (start, end) times, end None if unfinished."""
    runs: dict[str, list[tuple[float, float | None]]] = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        kind, uuid, at = line.split()
        if kind == "start":
            runs.setdefault(uuid, []).append((float(at), None))
        else:
            begun, _ = runs[uuid][-1]
            runs[uuid][-1] = (begun, float(at))
    return runs


def most_in_flight(log: Path) -> int:
    """Return the most handlers that ran at the same time."""
    moments = []
    for runs in spans(log).values():
        for begun, ended in runs:
            moments += [(begun, 1), (ended if ended is not None else float("inf"), -1)]
    in_flight = peak = 0
    for _, change in sorted(moments, key=lambda moment: (moment[0], moment[1])):
        in_flight += change
        peak = max(peak, in_flight)
    return peak


def in_flight_now(log: Path) -> int:
    return sum(1 for runs in spans(log).values() for _, ended in runs if ended is None)


def count(status: str) -> int:
    return OutboxEvent.objects.filter(status=status).count()


def span(log: Path, **payload: object) -> OutboxEvent:
    return publish("outbox_testapp.span", {"log": str(log), **payload})


def test_concurrency__runs_n_handlers_at_once_each_write_once(workers, tmp_path):
    log = tmp_path / "log"
    events = [span(log, seconds=0.2) for _ in range(24)]

    worker = start(workers, "--drain", "--batch-size", "32")

    assert worker.wait(timeout=30) == 0
    assert count(Status.COMPLETED) == len(events)
    # Their writes committed with their completed marks: once each.
    runs = Counter(HandlerRun.objects.values_list("event_uuid", flat=True))
    assert runs == Counter(event.uuid for event in events)
    assert most_in_flight(log) == int(SLOTS)
    assert "concurrency=8" in worker.output


def test_concurrency__async_handlers_run_in_the_slots(workers, tmp_path):
    log = tmp_path / "log"
    events = [
        publish("outbox_testapp.async_span", {"log": str(log), "seconds": 0.2})
        for _ in range(16)
    ]

    assert start(workers, "--drain").wait(timeout=30) == 0

    assert count(Status.COMPLETED) == len(events)
    runs = Counter(HandlerRun.objects.values_list("event_uuid", flat=True))
    assert runs == Counter(event.uuid for event in events)
    assert most_in_flight(log) == int(SLOTS)


def test_concurrency__two_events_of_a_key_never_run_together(workers, tmp_path):
    log = tmp_path / "log"
    keyed = {
        key: [
            publish("outbox_testapp.span", {"log": str(log), "seconds": 0.05}, key=key)
            for _ in range(4)
        ]
        for key in ("org:1", "org:2")
    }

    assert start(workers, "--drain").wait(timeout=30) == 0

    runs = spans(log)
    for events in keyed.values():
        times = [runs[str(event.uuid)][0] for event in events]
        # Publish order, and each starts after the one before it ended.
        for (_, ended), (begun, _) in pairwise(times):
            assert ended is not None and begun >= ended
    assert most_in_flight(log) == 2  # the two keys, side by side


def lease_ends() -> dict[int, datetime]:
    return {
        pk: locked_until
        for pk, locked_until in OutboxEvent.objects.values_list("pk", "locked_until")
        if locked_until is not None
    }


def test_heartbeat__extends_the_lease_of_every_event_in_flight(workers, tmp_path):
    """Eight handlers outlive the first lease; a rival rescuing every 250 ms
    must take none of them."""
    log = tmp_path / "log"
    events = [span(log, seconds=2) for _ in range(8)]
    live = start(workers, "--stuck-timeout-ms", "500", "--worker-id", "live")
    wait_until(lambda: in_flight_now(log) == 8, timeout=10)
    first_lease_ends = lease_ends()
    start(workers, "--stuck-timeout-ms", "500", "--worker-id", "rival")

    def every_lease_extended() -> bool:
        with connection.cursor() as cursor:
            cursor.execute("SELECT statement_timestamp()")
            now = cursor.fetchone()[0]
        current = lease_ends()
        return all(now > first_lease_ends[pk] < current[pk] for pk in current)

    wait_until(every_lease_extended, timeout=5)
    assert in_flight_now(log) == 8  # all still running, past their first lease

    wait_until(lambda: count(Status.COMPLETED) == 8, timeout=15)
    assert set(OutboxEvent.objects.values_list("attempts", "locked_by")) == {
        (1, "live")
    }
    assert HandlerRun.objects.count() == len(events)
    assert live.stop() == 0


def test_kill_9__with_n_in_flight_loses_nothing_and_repeats_no_database_effect(
    workers, tmp_path
):
    log, gate = tmp_path / "log", tmp_path / "gate"
    events = [span(log, wait_for_file=str(gate)) for _ in range(12)]
    doomed = start(workers, "--stuck-timeout-ms", "1000", "--worker-id", "doomed")
    wait_until(lambda: in_flight_now(log) == 8, timeout=10)

    doomed.process.kill()
    doomed.wait()
    assert not HandlerRun.objects.exists()
    # Eight running, four queued behind them: all under the dead's lease.
    assert count(Status.PROCESSING) == 12
    gate.touch()
    heir = start(workers, "--stuck-timeout-ms", "1000", "--poll-ms", "100")
    wait_until(lambda: count(Status.COMPLETED) == len(events), timeout=20)

    assert heir.stop() == 0
    runs = Counter(HandlerRun.objects.values_list("event_uuid", flat=True))
    assert runs == Counter(event.uuid for event in events)  # once each
    external = Counter(len(runs) for runs in spans(log).values())
    assert external == {2: 8, 1: 4}  # the eight that were running ran again
    rescued = OutboxEvent.objects.filter(history__0__error="outbox.errors.LeaseExpired")
    assert rescued.count() == 12


def test_sigterm__finishes_every_handler_in_flight_then_exits_0(workers, tmp_path):
    log = tmp_path / "log"
    events = [span(log, seconds=1) for _ in range(30)]
    worker = start(workers)
    wait_until(lambda: in_flight_now(log) == 8, timeout=10)

    worker.send(signal.SIGTERM)

    assert worker.wait(timeout=15) == 0
    assert count(Status.COMPLETED) == 8  # those in flight, and no more
    assert set(
        OutboxEvent.objects.exclude(status=Status.COMPLETED).values_list(
            "status", "attempts", "locked_by"
        )
    ) == {(Status.PENDING, 0, "")}
    assert HandlerRun.objects.count() == 8
    # Sixteen more were queued for the slots (two per slot), claimed but never
    # started; six were never claimed.
    assert "claimed=24 completed=8 retried=0 failed=0 released=16" in worker.output
    assert len(events) == 30


def test_second_signal__exits_at_once_with_n_in_flight(workers, tmp_path):
    log, gate = tmp_path / "log", tmp_path / "gate"
    for _ in range(8):
        span(log, wait_for_file=str(gate))
    worker = start(workers)
    wait_until(lambda: in_flight_now(log) == 8, timeout=10)

    worker.send(signal.SIGTERM)
    worker.wait_for_output("stopping on SIGTERM")
    worker.send(signal.SIGTERM)

    assert worker.wait(timeout=5) == 128 + signal.SIGTERM
    assert count(Status.PROCESSING) == 8  # the leases cover them


def test_hanging_handler__holds_one_slot_not_the_worker(workers, tmp_path):
    log, gate = tmp_path / "log", tmp_path / "gate"
    hanging = span(log, wait_for_file=str(gate))
    others = [span(log) for _ in range(30)]
    worker = start(workers)

    wait_until(lambda: count(Status.COMPLETED) == len(others), timeout=15)
    hanging.refresh_from_db()
    assert hanging.status == Status.PROCESSING
    gate.touch()
    wait_until(lambda: count(Status.COMPLETED) == len(others) + 1, timeout=10)
    assert worker.stop() == 0


def test_lost_connection__in_one_slot_does_not_stop_the_others(workers, tmp_path):
    log = tmp_path / "log"
    doomed = span(log, kill_connection=True, seconds=0.1)
    others = [span(log, seconds=0.1) for _ in range(15)]

    worker = start(workers, "--poll-ms", "100")
    wait_until(lambda: count(Status.COMPLETED) == len(others) + 1, timeout=20)

    assert worker.stop() == 0
    doomed.refresh_from_db()
    assert doomed.attempts == 2
    assert "OperationalError" in doomed.history[0]["error"]
    runs = Counter(HandlerRun.objects.values_list("event_uuid", flat=True))
    assert runs == Counter(event.uuid for event in [doomed, *others])


def test_outcomes__of_n_slots_that_lost_their_leases_are_fenced(register_handler):
    """Eight handlers in flight; their leases lapse and another worker takes
    the events. What the eight then write or report must change nothing."""
    gate, running = threading.Event(), []

    def write_when_let_go(event: OutboxEvent) -> None:
        running.append(event.pk)
        assert gate.wait(10)
        SideEffect.objects.create(event_uuid=event.uuid, note="stale")

    register_handler("gated", write_when_let_go)
    register_handler("noop", lambda event: None)
    events = [publish("gated", {}) for _ in range(4)]
    events += [publish("noop", {}) for _ in range(4)]
    stale = Worker(worker_id="stale", concurrency=8)
    loop = InThread(lambda: stale.run(max_events=8, poll_seconds=0.05))
    try:
        wait_until(lambda: len(running) == 4, timeout=10)
        wait_until(lambda: count(Status.COMPLETED) == 4, timeout=10)  # the no-ops
        OutboxEvent.objects.filter(status=Status.PROCESSING).update(
            locked_until=Now() - timedelta(seconds=1)
        )
        assert Worker(worker_id="lifeline").rescue_expired() == 4
        OutboxEvent.objects.update(available_at=Now())
        fresh = Worker(worker_id="fresh").claim()
        assert len(fresh) == 4
    finally:
        gate.set()
        result = loop.join()

    assert (result.completed, result.lost) == (4, 4)
    assert not SideEffect.objects.exists()  # the stale writes rolled back
    assert set(
        OutboxEvent.objects.filter(pk__in=[e.pk for e in events[:4]]).values_list(
            "status", "locked_by", "attempts"
        )
    ) == {(Status.PROCESSING, "fresh", 2)}


class WorkerDied(BaseException):
    """The worker process ends here: nothing after it runs, nothing catches it."""


def test_slot_writes__commit_with_their_marks_when_the_worker_dies_before_its_turn(
    register_handler, monkeypatch
):
    """Eight handlers write, then the worker dies before its next turn commits.

    Each handler's writes and its completed mark share its slot's transaction,
    so every row written belongs to a completed event: none will run again.
    """
    register_handler(
        "write",
        lambda event: SideEffect.objects.create(event_uuid=event.uuid, note="w"),
    )
    for _ in range(8):
        publish("write", {})
    finished = threading.Event()

    def die_once_all_finished(runs, **kwargs):
        if runs:
            finished.wait(10)
            raise WorkerDied
        return record(runs, **kwargs)

    monkeypatch.setattr("outbox.worker.record", die_once_all_finished)
    worker = Worker(worker_id="doomed", concurrency=8)
    loop = InThread(lambda: worker.run(poll_seconds=0.05))
    wait_until(lambda: SideEffect.objects.count() == 8, timeout=10)
    finished.set()
    with pytest.raises(WorkerDied):
        loop.join()

    written = set(SideEffect.objects.values_list("event_uuid", flat=True))
    completed = set(
        OutboxEvent.objects.filter(status=Status.COMPLETED).values_list(
            "uuid", flat=True
        )
    )
    assert written == completed
