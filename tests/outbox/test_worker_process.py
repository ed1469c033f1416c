"""run_outbox_worker as operators run it: real processes, real signals."""

import signal
import sqlite3
import time
from collections import Counter

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from outbox import publish
from outbox.models import OutboxEvent, OutboxWorker, Status
from tests.outbox.worker_process import WorkerProcess, manage, wait_until
from tests.outbox_app.models import HandlerRun, SideEffect

# Every test here starts real worker processes: seconds each.
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def start(
    workers: list[WorkerProcess],
    *arguments: str,
    database_url: str | None = None,
    **environment: str,
):
    worker = WorkerProcess(
        *arguments, environment=environment, database_url=database_url
    )
    workers.append(worker)
    return worker


def count(status: str) -> int:
    return OutboxEvent.objects.filter(status=status).count()


def test_drain__completes_what_was_published_and_exits_0(workers):
    for number in range(50):
        publish("outbox_testapp.record", {"n": number})

    worker = start(workers, "--drain", "--batch-size", "8", "--worker-id", "drainer")

    assert worker.wait() == 0
    assert count(Status.COMPLETED) == 50
    assert SideEffect.objects.filter(note="drainer").count() == 50
    assert "outbox worker started: id=drainer" in worker.output
    assert "batch_size=8 poll_ms=2000 stuck_timeout_ms=60000" in worker.output
    assert "outbox turn completed=8 retried=0" in worker.output
    assert "outbox drained" in worker.output


def test_verbosity_2__logs_each_event_without_its_payload(workers):
    event = publish("outbox_testapp.record", {"email": "ann@example.com"})

    worker = start(workers, "--drain", "-v", "2")

    assert worker.wait() == 0
    assert f"outbox event completed id={event.pk} type=outbox_testapp.record" in (
        worker.output
    )
    assert "ann@example.com" not in worker.output


def test_max_events__stops_after_that_many_and_leaves_the_rest(workers):
    for number in range(10):
        publish("outbox_testapp.record", {"n": number})

    worker = start(workers, "--max-events", "4", "--batch-size", "3")

    assert worker.wait() == 0
    assert count(Status.COMPLETED) == 4
    assert "claimed=4 completed=4" in worker.output
    assert set(
        OutboxEvent.objects.exclude(status=Status.COMPLETED).values_list(
            "status", "attempts", "locked_by", "locked_until"
        )
    ) == {(Status.PENDING, 0, "", None)}


def idle_after(worker: WorkerProcess, text: str, occurrence: int = 1) -> bool:
    """Whether the worker went idle after the occurrence-th line containing text."""
    output, position = worker.output, -1
    for _ in range(occurrence):
        position = output.find(text, position + 1)
        if position < 0:
            return False
    return "outbox idle" in output[position:]


def test_wakeup__handles_a_committed_event_without_waiting_for_the_poll(workers):
    worker = start(workers, "--poll-ms", "30000", "-v", "2")
    worker.wait_for_output("outbox listening on channel outbox_outboxevent")
    wait_until(lambda: idle_after(worker, "outbox listening"))  # in its 30 s wait

    published_at = time.time()
    event = publish("outbox_testapp.clock", {})
    wait_until(
        lambda: SideEffect.objects.filter(event_uuid=event.uuid).exists(),
        timeout=5,
        context=lambda: worker.output,
    )

    started_at = float(SideEffect.objects.get(event_uuid=event.uuid).note)
    # A sanity bound, far above the milliseconds the benchmark measures.
    assert started_at - published_at < 1.0, worker.output
    assert worker.stop() == 0


def test_sigterm__while_idle_exits_0_at_once(workers):
    worker = start(workers, "--poll-ms", "30000")
    worker.wait_for_output("outbox listening")

    worker.send(signal.SIGTERM)

    assert worker.wait(timeout=5) == 0
    assert "outbox worker stopping on SIGTERM" in worker.output
    assert "outbox worker stopped cleanly" in worker.output


def test_polling__a_worker_that_does_not_listen_picks_up_a_new_event(workers):
    worker = start(workers, "--poll-ms", "100", "-v", "2", OUTBOX_LISTEN="0")
    worker.wait_for_output("outbox worker started")
    assert "listen=False" in worker.output
    worker.wait_for_output("outbox idle")  # its first claim found nothing

    publish("outbox_testapp.record", {})  # so only a later poll can find this

    wait_until(lambda: count(Status.COMPLETED) == 1, timeout=5)
    assert "outbox listening" not in worker.output
    assert worker.stop() == 0


def test_sigint__while_idle_on_sqlite_style_polling_exits_0(workers):
    worker = start(workers, "--poll-ms", "30000", OUTBOX_LISTEN="0")
    worker.wait_for_output("outbox worker started")
    assert "listen=False" in worker.output

    worker.send(signal.SIGINT)

    assert worker.wait(timeout=5) == 0
    assert "stopped cleanly" in worker.output


def test_sigterm__lets_the_handler_finish_and_releases_the_rest(workers, tmp_path):
    started = tmp_path / "started"
    slow = publish("outbox_testapp.sleep", {"seconds": 3, "started_file": str(started)})
    rest = [publish("outbox_testapp.record", {"n": n}) for n in range(5)]
    worker = start(workers, "--batch-size", "10")
    wait_until(started.exists)

    worker.send(signal.SIGTERM)

    assert worker.wait(timeout=10) == 0
    slow.refresh_from_db()
    assert (slow.status, slow.attempts) == (Status.COMPLETED, 1)
    for event in rest:
        event.refresh_from_db()
        assert (event.status, event.attempts, event.locked_by) == (
            Status.PENDING,
            0,
            "",
        )
    assert "released=5" in worker.output
    assert not OutboxWorker.objects.exists()


def test_second_signal__exits_at_once_and_the_lease_covers_the_event(workers, tmp_path):
    started = tmp_path / "started"
    slow = publish(
        "outbox_testapp.sleep", {"seconds": 30, "started_file": str(started)}
    )
    worker = start(workers)
    wait_until(started.exists)

    worker.send(signal.SIGTERM)
    worker.wait_for_output("stopping on SIGTERM")
    worker.send(signal.SIGTERM)

    assert worker.wait(timeout=5) == 128 + signal.SIGTERM
    assert "received SIGTERM again: exiting at once" in worker.output
    slow.refresh_from_db()
    assert slow.status == Status.PROCESSING
    assert slow.locked_until is not None


def test_shutdown_timeout__exits_non_zero_when_the_handler_outlives_it(
    workers, tmp_path
):
    started = tmp_path / "started"
    slow = publish(
        "outbox_testapp.sleep", {"seconds": 30, "started_file": str(started)}
    )
    worker = start(workers, "--shutdown-timeout", "0.5")
    wait_until(started.exists)

    worker.send(signal.SIGTERM)

    assert worker.wait(timeout=10) == 1
    assert "shutdown timeout" in worker.output
    slow.refresh_from_db()
    assert slow.status == Status.PROCESSING


def test_kill_9__mid_batch_loses_nothing_and_repeats_no_database_effect(
    workers, tmp_path
):
    log, started, gate = tmp_path / "log", tmp_path / "started", tmp_path / "gate"
    events = [
        publish(
            "outbox_testapp.run",
            {"log": str(log)}
            | (
                {"started_file": str(started), "wait_for_file": str(gate)}
                if n == 3
                else {}
            ),
        )
        for n in range(20)
    ]
    doomed = start(
        workers,
        "--batch-size",
        "5",
        "--stuck-timeout-ms",
        "1000",
        "--worker-id",
        "doomed",
    )
    wait_until(started.exists)  # the fourth handler of the first batch runs
    doomed.process.kill()  # SIGKILL mid-batch
    doomed.wait()

    # Four handlers ran (their external effects happened); the first three
    # committed their database effects with their completed marks; the one
    # running and the one not started are still leased to the dead.
    assert len(log.read_text().split()) == 4
    assert set(HandlerRun.objects.values_list("event_uuid", flat=True)) == {
        event.uuid for event in events[:3]
    }
    assert count(Status.COMPLETED) == 3
    assert set(
        OutboxEvent.objects.filter(status=Status.PROCESSING).values_list("locked_by")
    ) == {("doomed",)}
    assert count(Status.PROCESSING) == 2
    gate.touch()
    heir = start(workers, "--poll-ms", "100", "--stuck-timeout-ms", "1000")
    wait_until(lambda: count(Status.COMPLETED) == len(events), timeout=20)

    assert heir.stop() == 0
    runs = Counter(HandlerRun.objects.values_list("event_uuid", flat=True))
    assert runs == Counter(event.uuid for event in events)  # once each, no more
    external = Counter(log.read_text().split())
    assert sorted(external.values()) == [1] * 19 + [2]  # at least once
    rescued = OutboxEvent.objects.filter(history__0__error="outbox.errors.LeaseExpired")
    assert set(rescued) == set(events[3:5])


def database_now():
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement_timestamp()")
        return cursor.fetchone()[0]


def test_slow_handler__of_a_live_worker_is_not_taken_over(workers, tmp_path):
    for name in ("first", "second"):
        start(
            workers,
            "--worker-id",
            name,
            "--poll-ms",
            "50",
            "--stuck-timeout-ms",
            "500",
        )
    for worker in workers:
        worker.wait_for_output("outbox listening")
    started = tmp_path / "started"
    event = publish(
        "outbox_testapp.sleep", {"seconds": 2, "started_file": str(started)}
    )
    wait_until(started.exists)
    # The first lease runs out while the handler still runs; the heartbeat
    # keeps extending it, and the rival, rescuing every 250 ms, must leave
    # the event alone.
    first_lease_end = OutboxEvent.objects.get(pk=event.pk).locked_until
    wait_until(
        lambda: (
            OutboxEvent.objects.filter(
                pk=event.pk,
                status=Status.PROCESSING,
                locked_until__gt=first_lease_end,
            ).exists()
            and database_now() > first_lease_end
        ),
        timeout=5,
    )

    wait_until(lambda: count(Status.COMPLETED) == 1, timeout=15)
    event.refresh_from_db()
    assert event.attempts == 1
    assert SideEffect.objects.count() == 1
    assert all(worker.process.poll() is None for worker in workers)
    assert [worker.stop() for worker in workers] == [0, 0]
    assert "rescued" not in workers[0].output + workers[1].output


def terminate_other_backends() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return cursor.fetchone()[0]


def test_connection_loss__the_worker_reconnects_and_carries_on(workers):
    worker = start(workers, "--poll-ms", "30000", "-v", "2")
    worker.wait_for_output("outbox listening")
    publish("outbox_testapp.record", {"n": 1})
    wait_until(lambda: count(Status.COMPLETED) == 1)

    assert terminate_other_backends() >= 2  # the claiming and the listening one
    # Listening again, then idle in a 30 s wait: only a NOTIFY is fast enough.
    wait_until(
        lambda: idle_after(worker, "outbox listening on channel", occurrence=2),
        timeout=10,
        context=lambda: worker.output,
    )
    for number in range(5):
        publish("outbox_testapp.record", {"n": number})
    wait_until(lambda: count(Status.COMPLETED) == 6, timeout=10)

    assert worker.process.poll() is None
    assert "outbox lost its listening connection" in worker.output
    assert worker.stop() == 0


def test_tick_failure__is_logged_and_the_next_tick_runs(workers):
    worker = start(workers, "--poll-ms", "50")
    worker.wait_for_output("outbox listening")
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE outbox_outboxevent RENAME TO outbox_hidden")
    try:
        worker.wait_for_output("outbox tick failed")
    finally:
        with connection.cursor() as cursor:
            cursor.execute("ALTER TABLE outbox_hidden RENAME TO outbox_outboxevent")

    publish("outbox_testapp.record", {})
    wait_until(lambda: count(Status.COMPLETED) == 1, timeout=10)

    assert "Traceback" in worker.output
    assert worker.process.poll() is None
    assert worker.stop() == 0


def test_identity__a_running_worker_is_recorded_until_it_stops(workers):
    worker = start(
        workers,
        "--worker-id",
        "visible",
        "--poll-ms",
        "50",
        "--stuck-timeout-ms",
        "300",
    )
    worker.wait_for_output("outbox listening")

    record = OutboxWorker.objects.get(worker_id="visible")
    assert record.pid == worker.pid
    # Its heartbeat (every 100 ms with this lease) keeps it looking alive.
    wait_until(
        lambda: OutboxWorker.objects.filter(
            worker_id="visible", last_seen_at__gt=record.started_at
        ).exists(),
        timeout=5,
    )
    assert worker.stop() == 0
    assert not OutboxWorker.objects.filter(worker_id="visible").exists()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--batch-size", "0"),
        ("--poll-ms", "soon"),
        ("--stuck-timeout-ms", "-1"),
        ("--max-events", "0"),
        ("--shutdown-timeout", "never"),
    ],
)
def test_invalid_option__fails_naming_it(option, value):
    with pytest.raises(CommandError, match=option):
        call_command("run_outbox_worker", option, value)


def test_empty_worker_id__is_refused():
    with pytest.raises(CommandError, match="--worker-id"):
        call_command("run_outbox_worker", "--worker-id", " ")


SQLITE_EVENTS = 200
PUBLISH_ON_SQLITE = f"""
from outbox import NewEvent, publish_many
publish_many(
    NewEvent("outbox_testapp.run", {{"log": LOG, "seconds": 0.002}})
    for _ in range({SQLITE_EVENTS})
)
"""


def test_sqlite__two_workers_on_one_file_handle_every_event_once(workers, tmp_path):
    """The embedded default: IMMEDIATE transactions serialise the two claimers.

    Each event runs once, and neither worker ever meets "database is locked":
    the one that waits for the other's transaction waits at its BEGIN. (Which
    worker gets how many events is up to SQLite's lock; often one gets all.)
    """
    url = f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    log = tmp_path / "log"
    manage(url, "migrate", "--run-syncdb", "--no-input")
    for name in ("one", "two"):
        start(
            workers,
            "--worker-id",
            name,
            "--poll-ms",
            "20",
            "--batch-size",
            "4",
            database_url=url,
        )
    for worker in workers:
        worker.wait_for_output("outbox worker started")

    manage(url, "shell", "-c", f"LOG = {str(log)!r}" + PUBLISH_ON_SQLITE)

    with sqlite3.connect(tmp_path / "outbox.sqlite3", timeout=20) as database:
        wait_until(
            lambda: (
                database.execute(
                    "SELECT count(*) FROM outbox_outboxevent WHERE status = 'completed'"
                ).fetchone()[0]
                == SQLITE_EVENTS
            ),
            timeout=60,
            context=lambda: workers[0].output + workers[1].output,
        )
        runs = database.execute(
            "SELECT count(*), count(DISTINCT event_uuid) FROM outbox_testapp_handlerrun"
        ).fetchone()
        attempts = database.execute(
            "SELECT max(attempts) FROM outbox_outboxevent"
        ).fetchone()[0]
    assert [worker.stop() for worker in workers] == [0, 0]
    assert runs == (SQLITE_EVENTS, SQLITE_EVENTS)  # once each
    assert attempts == 1  # no handler failed on a lock
    output = workers[0].output + workers[1].output
    assert "tick failed" not in output
    assert "locked" not in output
