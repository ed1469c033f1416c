"""Handlers found by the outbox's autodiscovery, used by the worker tests.

The worker tests run real `run_outbox_worker` processes, which find these
through the same discovery as any project's handlers.
"""

import asyncio
import time
from pathlib import Path

from django.db import connection

from outbox import handler
from outbox.models import OutboxEvent
from tests.outbox_app.models import HandlerRun, SideEffect


@handler("outbox_testapp.discovered")
def record_discovery(event: OutboxEvent) -> None:
    SideEffect.objects.create(event_uuid=event.uuid, note="discovered")


@handler("outbox_testapp.record")
def record_worker(event: OutboxEvent) -> None:
    """Write one row naming the worker; a second run would hit the constraint."""
    SideEffect.objects.create(event_uuid=event.uuid, note=event.locked_by)


@handler("outbox_testapp.sleep")
def sleep_then_record(event: OutboxEvent) -> None:
    """Touch payload['started_file'], sleep payload['seconds'], then record."""
    if started_file := event.payload.get("started_file"):
        Path(started_file).touch()
    time.sleep(event.payload["seconds"])
    SideEffect.objects.create(event_uuid=event.uuid, note=event.locked_by)


@handler("outbox_testapp.clock")
def record_start_time(event: OutboxEvent) -> None:
    """Record when the handler started, to measure commit-to-handler latency."""
    SideEffect.objects.create(event_uuid=event.uuid, note=repr(time.time()))


@handler("outbox_testapp.run")
def log_then_record(event: OutboxEvent) -> None:
    """Append the event's UUID to payload['log'] (an external effect), touch
    payload['started_file'], wait for payload['wait_for_file'] to exist, sleep
    payload['seconds'], then write a HandlerRun row (a database effect)."""
    payload = event.payload
    with Path(payload["log"]).open("a") as log:
        log.write(f"{event.uuid}\n")
    if started_file := payload.get("started_file"):
        Path(started_file).touch()
    if gate := payload.get("wait_for_file"):
        while not Path(gate).exists():
            time.sleep(0.01)
    time.sleep(payload.get("seconds", 0))
    # Read, then write, as most handlers do: on SQLite that is what needs
    # IMMEDIATE transactions (a deferred one fails to upgrade its lock).
    HandlerRun.objects.filter(event_uuid=event.uuid).exists()
    HandlerRun.objects.create(event_uuid=event.uuid, worker=event.locked_by)


@handler("outbox_testapp.span")
def log_span_then_record(event: OutboxEvent) -> None:
    """Log "start <uuid> <time>" and "end <uuid> <time>" to payload['log'] around
    the work: wait for payload['wait_for_file'], sleep payload['seconds'], then
    write a HandlerRun row. On its first attempt with payload['kill_connection'],
    terminate its own database session first, as a database restart would."""
    payload = event.payload
    _append(payload["log"], f"start {event.uuid} {time.time()!r}")
    if payload.get("kill_connection") and event.attempts == 1:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")
    if gate := payload.get("wait_for_file"):
        while not Path(gate).exists():
            time.sleep(0.01)
    time.sleep(payload.get("seconds", 0))
    HandlerRun.objects.create(event_uuid=event.uuid, worker=event.locked_by)
    _append(payload["log"], f"end {event.uuid} {time.time()!r}")


@handler("outbox_testapp.async_span")
async def log_span_then_record_async(event: OutboxEvent) -> None:
    """log_span_then_record's twin as a coroutine: asyncio.sleep, acreate()."""
    payload = event.payload
    _append(payload["log"], f"start {event.uuid} {time.time()!r}")
    await asyncio.sleep(payload.get("seconds", 0))
    await HandlerRun.objects.acreate(event_uuid=event.uuid, worker=event.locked_by)
    _append(payload["log"], f"end {event.uuid} {time.time()!r}")


def _append(path: str, line: str) -> None:
    with Path(path).open("a") as log:
        log.write(line + "\n")


@handler("outbox_testapp.fanout", name="steady")
def record_steadily(event: OutboxEvent) -> None:
    """One of two subscribers: log "steady <uuid> <attempt>", record a run."""
    _append(event.payload["log"], f"steady {event.uuid} {event.attempts}")
    HandlerRun.objects.create(event_uuid=event.uuid, worker=f"steady:{event.pk}")


@handler("outbox_testapp.fanout", name="flaky")
def fail_first_then_record(event: OutboxEvent) -> None:
    """The other: fails its first attempt at each event, then records."""
    _append(event.payload["log"], f"flaky {event.uuid} {event.attempts}")
    if event.attempts == 1:
        raise ConnectionError("the CRM is down")
    HandlerRun.objects.create(event_uuid=event.uuid, worker=f"flaky:{event.pk}")
