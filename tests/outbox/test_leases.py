"""Invariants 3 and 5: one owner at a time, fenced outcomes, nothing lost."""

import threading
import time
from datetime import timedelta

import pytest
from django.db import DatabaseError, OperationalError, connection
from django.db.models.functions import Now

from outbox import publish
from outbox.models import OutboxEvent, OutboxWorker, Status
from outbox.runner import Runner, RunOptions
from outbox.worker import Worker
from tests.outbox.sessions import InThread, backend_pid, terminate
from tests.outbox.worker_process import wait_until
from tests.outbox_app.models import SideEffect

pytestmark = pytest.mark.django_db(transaction=True)


def record_worker(event: OutboxEvent) -> None:
    SideEffect.objects.create(event_uuid=event.uuid, note=event.locked_by)


def expire_leases(*events: OutboxEvent) -> None:
    """End these events' leases now, as if their worker had stalled past them."""
    OutboxEvent.objects.filter(pk__in=[event.pk for event in events]).update(
        locked_until=Now() - timedelta(seconds=1)
    )


def rescue(*events: OutboxEvent) -> int:
    """Expire the events' leases and rescue them; make those retried ready now."""
    expire_leases(*events)
    rescued = Worker(worker_id="lifeline").rescue_expired()
    OutboxEvent.objects.filter(
        pk__in=[event.pk for event in events], status=Status.PENDING
    ).update(available_at=Now())
    return rescued


def run_until_done(worker: Worker, event: OutboxEvent, *, rounds: int = 100) -> None:
    for _ in range(rounds):
        worker.run_once()
        event.refresh_from_db()
        if event.status in (Status.COMPLETED, Status.FAILED):
            return
        time.sleep(0.01)
    raise AssertionError(f"event still {event.status} after {rounds} rounds")


def test_outcome__of_a_worker_that_lost_its_lease_is_not_recorded(
    register_handler, fast_outbox
):
    register_handler("effect", record_worker)
    event = publish("effect", {})
    slow = Worker(worker_id="slow")
    claimed = slow.claim()  # then the worker stalls past its lease
    expire_leases(event)

    run_until_done(Worker(worker_id="fresh"), event)
    result = slow.process(claimed)

    assert (result.lost, result.completed) == (1, 0)
    event.refresh_from_db()
    assert (event.status, event.locked_by, event.attempts) == (
        Status.COMPLETED,
        "fresh",
        2,
    )
    assert list(SideEffect.objects.values_list("note", flat=True)) == ["fresh"]


@pytest.mark.parametrize(
    ("stale_id", "fresh_id"),
    [("stale", "fresh"), ("same-id", "same-id")],
    ids=["another-worker", "a-worker-with-the-same-id"],
)
def test_outcome__of_a_worker_whose_event_was_claimed_again_is_not_recorded(
    register_handler, stale_id, fresh_id
):
    """The stale outcome arrives while the new owner still holds the event.

    Only the lease token tells the two claims apart: same status, and with
    a misconfigured deployment the same worker id.
    """
    register_handler("effect", record_worker)
    event = publish("effect", {})
    stale = Worker(worker_id=stale_id)
    stale_claim = stale.claim()
    assert rescue(event) == 1
    fresh = Worker(worker_id=fresh_id)
    fresh_claim = fresh.claim()
    assert [claimed.pk for claimed in fresh_claim] == [event.pk]

    result = stale.process(stale_claim)

    assert (result.lost, result.completed) == (1, 0)
    event.refresh_from_db()
    assert (event.status, event.attempts) == (Status.PROCESSING, 2)
    assert not SideEffect.objects.exists()
    assert fresh.process(fresh_claim).completed == 1
    assert SideEffect.objects.count() == 1


@pytest.mark.parametrize(
    ("max_attempts", "status_after_rescue"),
    [(5, Status.PENDING), (1, Status.FAILED)],
    ids=["pending-again", "failed"],
)
def test_outcome__of_a_worker_whose_event_was_rescued_is_not_recorded(
    register_handler, max_attempts, status_after_rescue
):
    """The rescued event still carries the stale claim's token; its status differs."""
    register_handler("effect", record_worker)
    event = publish("effect", {}, max_attempts=max_attempts)
    stale = Worker(worker_id="stale")
    claimed = stale.claim()
    assert rescue(event) == 1

    result = stale.process(claimed)

    assert (result.lost, result.completed) == (1, 0)
    event.refresh_from_db()
    assert (event.status, event.attempts) == (status_after_rescue, 1)
    assert not SideEffect.objects.exists()


def test_outcome__of_a_partly_lost_batch_is_recorded_for_the_rest(register_handler):
    register_handler("effect", record_worker)
    lost, kept = publish("effect", {}), publish("effect", {})
    stale = Worker(worker_id="stale")
    claimed = stale.claim()
    assert rescue(lost) == 1
    assert [event.pk for event in Worker(worker_id="fresh").claim()] == [lost.pk]

    result = stale.process(claimed)

    assert (result.claimed, result.lost, result.completed) == (2, 1, 1)
    lost.refresh_from_db()
    kept.refresh_from_db()
    assert (lost.status, lost.locked_by) == (Status.PROCESSING, "fresh")
    assert (kept.status, kept.locked_by) == (Status.COMPLETED, "stale")
    assert list(SideEffect.objects.values_list("event_uuid", flat=True)) == [kept.uuid]


def lease_has_run_out(event: OutboxEvent) -> bool:
    return OutboxEvent.objects.filter(pk=event.pk, locked_until__lt=Now()).exists()


def test_slow_handler__is_not_taken_over_while_its_worker_holds_it(
    register_handler, fast_outbox
):
    started = threading.Event()
    finish = threading.Event()

    def slow_handler(event: OutboxEvent) -> None:
        started.set()
        assert finish.wait(10)
        record_worker(event)

    register_handler("slow", slow_handler)
    event = publish("slow", {})

    slow = InThread(Worker(worker_id="slow").run_once)
    try:
        assert started.wait(5)
        wait_until(lambda: lease_has_run_out(event), timeout=5)
        assert slow.thread.is_alive()  # the handler is still running
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = '2s'")  # nor may the rival wait
        rival = Worker(worker_id="rival")
        rescued = rival.rescue_expired()
        claimed = rival.run_once().claimed
    finally:
        finish.set()
        slow.join()
        connection.close()  # forget the session's lock timeout

    assert (rescued, claimed) == (0, 0)
    event.refresh_from_db()
    assert (event.status, event.attempts) == (Status.COMPLETED, 1)
    assert list(SideEffect.objects.values_list("note", flat=True)) == ["slow"]


def test_dead_workers_events__are_claimed_again_once_the_lease_expires(
    register_handler, fast_outbox
):
    register_handler("effect", record_worker)
    event = publish("effect", {})
    Worker(worker_id="dead").claim()  # and the process dies

    assert Worker(worker_id="early").run_once().claimed == 0  # lease still valid
    wait_until(lambda: lease_has_run_out(event), timeout=5)
    run_until_done(Worker(worker_id="heir"), event)

    assert event.attempts == 2
    assert event.history[0]["error"] == "outbox.errors.LeaseExpired"
    assert event.history[0]["worker"] == "dead"
    assert list(SideEffect.objects.values_list("note", flat=True)) == ["heir"]


def test_event_that_keeps_killing_workers__ends_failed(register_handler):
    register_handler("poison", record_worker)
    event = publish("poison", {}, max_attempts=3)

    for number in range(3):
        assert Worker(worker_id=f"victim-{number}").claim()  # and dies
        assert rescue(event) == 1

    event.refresh_from_db()
    assert event.status == Status.FAILED
    assert event.attempts == 3
    assert [entry["worker"] for entry in event.history] == [
        "victim-0",
        "victim-1",
        "victim-2",
    ]
    assert not SideEffect.objects.exists()


def test_rescue__failing_a_keys_head_lets_the_next_event_run(register_handler):
    register_handler("effect", record_worker)
    head = publish("effect", {}, key="org:1", max_attempts=1)
    following = publish("effect", {}, key="org:1")
    Worker(worker_id="dead").claim()

    assert rescue(head) == 1

    head.refresh_from_db()
    assert head.status == Status.FAILED
    assert list(OutboxEvent.objects.ready()) == [following]


class Plug:
    """A handler after which the worker's connection dies, killed from outside.

    arm() notes the backend of the worker's connection, from the worker's own
    thread; the handler itself never uses that connection, so the batch
    notices only when it next talks to the server: at COMMIT.
    """

    def __init__(self) -> None:
        self.backend: int | None = None

    def arm(self) -> None:
        self.backend = backend_pid()

    def __call__(self, event: OutboxEvent) -> None:
        assert self.backend is not None, "arm() the plug before the batch runs"
        terminate(self.backend)


def test_handler_writes__are_lost_with_a_connection_that_dies_before_the_commit(
    register_handler,
):
    plug = Plug()
    register_handler("effect", record_worker)
    register_handler("pull-the-plug", plug)
    event = publish("effect", {})
    publish("pull-the-plug", {})
    worker = Worker(worker_id="w", batch_size=10)
    claimed = worker.claim()
    plug.arm()

    with pytest.raises(DatabaseError):
        worker.process(claimed)  # both handlers ran; the COMMIT fails

    connection.close()
    event.refresh_from_db()
    assert (event.status, event.locked_by) == (Status.PROCESSING, "w")
    assert not SideEffect.objects.exists()
    assert worker.held_tokens == frozenset()  # its lease lapses, for the rescue


def test_deferred_constraint__fails_only_the_handler_that_broke_it(register_handler):
    def orphan(event: OutboxEvent) -> None:
        SideEffect.objects.create(event_uuid=event.uuid, parent_id=999_999)

    register_handler("orphan", orphan)
    register_handler("effect", record_worker)
    bad = publish("orphan", {})
    good = [publish("effect", {}) for _ in range(3)]

    result = Worker().run_once()

    assert (result.completed, result.retried) == (3, 1)
    bad.refresh_from_db()
    assert "ForeignKeyViolation" in bad.last_error or "foreign key" in bad.last_error
    assert SideEffect.objects.filter(event_uuid__in=[e.uuid for e in good]).count() == 3


def test_batch_claimed_ahead__is_lost_with_a_connection_that_dies(register_handler):
    plug = Plug()
    register_handler("pull-the-plug", plug)
    publish("pull-the-plug", {})
    later = publish("pull-the-plug", {})
    worker = Worker(worker_id="w", batch_size=1)
    claimed = worker.claim()
    plug.arm()

    with pytest.raises(DatabaseError):
        worker.process(claimed)  # the full batch claims ahead on a dead connection

    connection.close()
    later.refresh_from_db()
    assert (later.status, later.attempts) == (Status.PENDING, 0)
    assert worker.release_claimed_ahead() == 0


def heartbeat_and_tick(runner, seconds=1.5):
    """What Runner does: the heartbeat extends leases every lease/3; ticks run."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        runner._extend_leases()
        try:
            runner._tick()
        except Exception:
            runner._discard_broken_connection()
        time.sleep(0.05)


def test_heartbeat__lets_the_lease_of_a_batch_lost_with_its_transaction_lapse(
    register_handler, fast_outbox
):
    calls = []

    def handler(event):
        calls.append(event.pk)
        if len(calls) == 1:  # the DB restarts / idle timeout kills the session
            with connection.cursor() as c:
                c.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        record_worker(event)

    register_handler("effect", handler)
    event = publish("effect", {})
    worker = Worker(worker_id="w")  # lease 200 ms
    runner = Runner(worker, RunOptions(poll_ms=50, listen=False))
    try:
        with pytest.raises(OperationalError):
            worker.run_once()
        runner._discard_broken_connection()
        heartbeat_and_tick(runner)  # 7 lease periods
    finally:
        runner.waiter.close()
    event.refresh_from_db()
    assert event.status == Status.COMPLETED, (event.status, event.locked_until)


def test_heartbeat__lets_a_batch_claimed_ahead_by_an_ambiguous_commit_lapse(
    register_handler, fast_outbox, monkeypatch
):
    register_handler("effect", record_worker)
    publish("effect", {})
    later = publish("effect", {})
    worker = Worker(worker_id="w", batch_size=1)
    runner = Runner(worker, RunOptions(poll_ms=50, listen=False))
    claimed = worker.claim()
    real_commit = connection.commit

    # The COMMIT reached the server and succeeded, but its reply was lost: a
    # failure only a patched commit can stage at exactly this point.
    def commit_then_lose_the_reply():
        real_commit()
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(connection, "commit", commit_then_lose_the_reply)
    with pytest.raises(OperationalError):
        worker.process(claimed)
    monkeypatch.undo()
    try:
        assert worker._claimed_ahead == []
        heartbeat_and_tick(runner)
    finally:
        runner.waiter.close()
    later.refresh_from_db()
    assert later.status == Status.COMPLETED, (later.status, later.locked_by)


class Heartbeat:
    """Run a Runner's heartbeat thread, as run_outbox_worker does, for a test."""

    def __init__(self, worker: Worker) -> None:
        self.runner = Runner(worker, RunOptions(poll_ms=50, listen=False))
        self.thread = threading.Thread(target=self.runner._beat)

    def __enter__(self) -> Runner:
        self.runner._register()
        self.thread.start()
        return self.runner

    def __exit__(self, *exc_info: object) -> None:
        self.runner._stopping.set()
        self.thread.join(5)
        self.runner.waiter.close()


def test_heartbeat__extends_the_leases_a_live_worker_holds(register_handler):
    register_handler("effect", record_worker)
    publish("effect", {})
    # A lease of 600 ms, renewed every 200 ms: room for a stall of the
    # heartbeat thread on a loaded machine.
    worker = Worker(worker_id="alive", stuck_timeout_ms=600)
    claimed = worker.claim()  # held, not yet handled
    first_lease_end = OutboxEvent.objects.get().locked_until
    assert first_lease_end is not None

    with Heartbeat(worker):
        wait_until(
            lambda: OutboxEvent.objects.filter(
                locked_until__gt=first_lease_end + timedelta(milliseconds=1200)
            ).exists(),
            timeout=5,
        )
        # The first lease has run out long ago; the live worker keeps it.
        assert OutboxEvent.objects.filter(locked_until__gt=Now()).exists()
        assert Worker(worker_id="rival").rescue_expired() == 0

    assert (worker.process(claimed).completed, SideEffect.objects.count()) == (1, 1)


def test_heartbeat__refreshes_the_workers_last_seen_at(fast_outbox):
    with Heartbeat(Worker(worker_id="alive")):
        registered = OutboxWorker.objects.get(worker_id="alive")
        wait_until(
            lambda: OutboxWorker.objects.filter(
                worker_id="alive", last_seen_at__gt=registered.last_seen_at
            ).exists(),
            timeout=5,
        )
