"""Invariants 3 and 5: one owner at a time, fenced outcomes, nothing lost."""

import threading
import time
from datetime import timedelta

import pytest
from django.db import OperationalError, connection, connections
from django.db.models.functions import Now

from outbox import publish, runner
from outbox.models import OutboxEvent, OutboxWorker, Status
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


def test_slow_handler__is_not_taken_over_while_its_worker_is_alive(register_handler):
    """The heartbeat keeps the lease of a handler in flight, long past its first end.

    The rival must neither take the event nor wait for it.
    """
    started = threading.Event()
    finish = threading.Event()

    def slow_handler(event: OutboxEvent) -> None:
        started.set()
        assert finish.wait(10)
        record_worker(event)

    register_handler("slow", slow_handler)
    event = publish("slow", {})
    worker = Worker(worker_id="slow", stuck_timeout_ms=600)
    with Heartbeat(worker):
        slow = InThread(worker.run_once)
        try:
            assert started.wait(5)
            first_lease_end = OutboxEvent.objects.get().locked_until
            wait_until(lambda: database_now() > first_lease_end, timeout=5)
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
    assert (event.status, event.locked_by, event.attempts) == (
        Status.COMPLETED,
        "slow",
        1,
    )


def database_now():
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement_timestamp()")
        return cursor.fetchone()[0]


def test_rescue__and_a_late_heartbeat_never_both_keep_an_expired_lease():
    """The rescue reads an expired lease; the stalled worker's heartbeat resumes.

    The rescue's row lock settles it: the heartbeat skips the row the rescue
    holds. Without it, the heartbeat extends the lease, the rescue retries
    the event all the same, and the worker goes on believing it holds it.
    """
    publish("effect", {})
    stalled = Worker(worker_id="stalled")
    [event] = stalled.claim()
    expire_leases(event)
    extended: list[int] = []

    def heartbeat_after_the_read(execute, sql, params, many, context):
        result = execute(sql, params, many, context)
        if not extended and "FOR UPDATE" in sql.upper():
            extended.append(InThread(stalled.leases.extend).join())
        return result

    with connection.execute_wrapper(heartbeat_after_the_read):
        rescued = Worker(worker_id="rival").rescue_expired()

    assert (rescued, extended) == (1, [0])


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


def test_handler_writes__roll_back_with_a_connection_that_dies_before_their_commit(
    register_handler,
):
    """The handler's transaction dies; the worker records a retry on a new one."""
    plug = Plug()

    def write_then_pull_the_plug(event: OutboxEvent) -> None:
        record_worker(event)
        plug(event)

    register_handler("effect", write_then_pull_the_plug)
    event = publish("effect", {})
    worker = Worker(worker_id="w")
    claimed = worker.claim()
    plug.arm()

    result = worker.process(claimed)  # the handler's COMMIT fails

    assert (result.completed, result.retried) == (0, 1)
    event.refresh_from_db()
    assert (event.status, event.attempts) == (Status.PENDING, 1)
    assert event.history[0]["worker"] == "w"
    assert not SideEffect.objects.exists()


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


def test_connection_lost_inside_a_handler__retries_the_event_and_the_worker_goes_on(
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
    worker = Worker(worker_id="w")

    assert worker.run_once().retried == 1
    run_until_done(worker, event)

    assert event.status == Status.COMPLETED
    assert SideEffect.objects.count() == 1


def test_batch_claimed_by_an_ambiguous_commit__lapses_and_is_handled_again(
    register_handler, fast_outbox
):
    """The loop's second turn records the first event and claims the second.

    Its COMMIT reaches the server and succeeds, but the reply is lost: the
    worker cannot know it holds the second event. Its lease must lapse (no
    heartbeat may keep it), the rescue hands it on, and the loop goes on.
    """
    calls = []
    register_handler("effect", lambda event: calls.append(event.pk))
    first = publish("effect", {})
    later = publish("effect", {})
    worker = Worker(worker_id="w", batch_size=1)

    def run_losing_the_second_commits_reply():
        loop_connection = connections["default"]  # this thread's own
        real_commit = loop_connection.commit
        lost: list[int] = []

        # A failure only a patched commit can stage at exactly this point.
        def commit_then_lose_the_reply():
            claims_later = not lost and (
                OutboxEvent.objects.filter(pk=later.pk, status=Status.PROCESSING)
                .exclude(attempts=0)
                .exists()
            )
            real_commit()
            if claims_later:
                lost.append(later.pk)
                raise OperationalError("server closed the connection unexpectedly")

        loop_connection.commit = commit_then_lose_the_reply  # type: ignore[method-assign]
        try:
            return worker.run(poll_seconds=0.05, survive_errors=True)
        finally:
            del loop_connection.commit

    loop = InThread(run_losing_the_second_commits_reply)
    try:
        wait_until(
            lambda: not OutboxEvent.objects.exclude(status=Status.COMPLETED).exists(),
            timeout=10,
        )
    finally:
        worker.stop()
        loop.join()
    first.refresh_from_db()
    later.refresh_from_db()
    assert (first.attempts, later.attempts) == (1, 2)
    assert later.history[0]["error"] == "outbox.errors.LeaseExpired"
    assert calls == [first.pk, later.pk]


class Heartbeat:
    """Run a worker's heartbeat thread, as run_outbox_worker does, for a test."""

    def __init__(self, worker: Worker) -> None:
        self.heartbeat = runner.Heartbeat(worker)

    def __enter__(self) -> runner.Heartbeat:
        self.heartbeat.register()
        self.heartbeat.start()
        return self.heartbeat

    def __exit__(self, *exc_info: object) -> None:
        self.heartbeat.stop()


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


def test_leases__a_stale_copy_neither_passes_nor_drops_the_new_claims_lease():
    """The worker stalled past its lease, the event was rescued, and the same
    worker claimed it again: its old queued copy must not run, and dropping
    it must keep the lease of the run under the new claim."""
    publish("effect", {})
    worker = Worker(worker_id="w")
    [stale] = worker.claim()
    assert rescue(stale) == 1
    [fresh] = worker.claim()

    assert not worker.leases.still_held(stale, using="default")
    worker.leases.drop([stale])
    assert len(worker.leases) == 1
    assert worker.leases.still_held(fresh, using="default")
