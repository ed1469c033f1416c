"""django.tasks on the outbox (outbox.tasks.OutboxTaskBackend).

Each test reads its promise from Django's task API: enqueue() joins the
caller's transaction, and get_result() shows what the worker did.
"""

import datetime
import math
import re
import uuid
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.core.management import call_command
from django.db import connection, transaction
from django.tasks import TaskResultStatus, default_task_backend, task_backends
from django.tasks.exceptions import (
    InvalidTask,
    TaskResultDoesNotExist,
    TaskResultMismatch,
)
from django.tasks.signals import task_enqueued, task_finished, task_started
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from outbox.models import OutboxEvent, Status
from outbox.tasks import OutboxTask, OutboxTaskBackend
from outbox.testing import drain
from outbox.worker import Worker
from tests.outbox_app import tasks
from tests.outbox_app.models import HandlerRun

pytestmark = [pytest.mark.sqlite, pytest.mark.django_db]


def options(task: Any) -> OutboxTask:
    """The task as the backend's own class, whose using() takes its options."""
    assert isinstance(task, OutboxTask)
    return task


def event_of(result: Any) -> OutboxEvent:
    return OutboxEvent.objects.get(uuid=result.id)


def run_until_done(limit: int = 10) -> None:
    """Drain, retrying whatever waits for a backoff, until nothing is unfinished."""
    for _ in range(limit):
        drain()
        waiting = OutboxEvent.objects.filter(status=Status.PENDING)
        if not waiting.exists():
            return
        waiting.update(available_at=timezone.now() - datetime.timedelta(seconds=1))
    raise AssertionError("events still unfinished")


# -- enqueue: the caller's transaction --------------------------------------


def test_backend__is_the_default_task_backend() -> None:
    assert isinstance(task_backends["default"], OutboxTaskBackend)
    assert isinstance(tasks.add, OutboxTask)


def test_enqueue__a_rollback_leaves_no_task() -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        tasks.add.enqueue(1, 2)
        raise RuntimeError("the view failed after enqueueing")

    assert not OutboxEvent.objects.exists()


def test_enqueue__writes_the_task_in_the_callers_transaction(
    django_capture_on_commit_callbacks: Any,
) -> None:
    with django_capture_on_commit_callbacks() as callbacks, transaction.atomic():
        result = tasks.add.enqueue(1, 2)
        # Inside the transaction, before its commit: the row is there, as
        # part of it, with nothing left for later to write.
        event = OutboxEvent.objects.get()
        assert str(event.uuid) == result.id

    assert len(callbacks) == 1  # task_enqueued, and nothing else
    assert event.event_type == "task:tests.outbox_app.tasks.add"
    assert event.payload == {"args": [1, 2], "kwargs": {}, "backend": "default"}
    assert event.queue_name == "default"
    assert result.status == TaskResultStatus.READY
    assert result.enqueued_at == event.created_at


@pytest.mark.django_db(transaction=True)
def test_aenqueue_and_aget_result__work_from_async_code() -> None:
    result = async_to_sync(tasks.add.aenqueue)(2, 3)
    drain()

    found = async_to_sync(tasks.add.aget_result)(result.id)

    assert found.status == TaskResultStatus.SUCCESSFUL
    assert found.return_value == 5


# -- JSON in, JSON out --------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "named"),
    [
        ((datetime.date(2026, 1, 1),), {}, "args[0] is a date"),
        ((), {"ids": {1: "a"}}, "kwargs['ids'] has the key 1"),
        ((uuid.uuid4(),), {}, "args[0] is a UUID"),
        ((b"bytes",), {}, "args[0] is a bytes"),
        (([math.nan],), {}, "args[0][0] is nan"),
        (({1, 2},), {}, "args[0] is a set"),
        (("a\x00b",), {}, "NUL"),
        ((1e16,), {}, "args[0] is 1e+16, which PostgreSQL's jsonb returns as"),
    ],
)
def test_enqueue__refuses_arguments_that_do_not_round_trip_through_json(
    args: tuple[Any, ...], kwargs: dict[str, Any], named: str
) -> None:
    with pytest.raises(InvalidTask, match=re.escape(named)):
        tasks.add.enqueue(*args, **kwargs)

    assert not OutboxEvent.objects.exists()


def test_enqueue__refuses_nesting_past_the_limit() -> None:
    nested: list[Any] = []
    for _ in range(200):
        nested = [nested]

    with pytest.raises(InvalidTask, match="nested more than 100 levels"):
        tasks.add.enqueue(nested, 1)  # type: ignore[arg-type]


def test_enqueue__refuses_arguments_that_share_a_list_past_the_size_limit() -> None:
    """[x, x] twenty-four times over is 16 million values in JSON: refused in time."""
    shared: list[Any] = [1]
    for _ in range(24):
        shared = [shared, shared]

    with (
        override_settings(OUTBOX={"MAX_PAYLOAD_BYTES": 10_000}),
        pytest.raises(InvalidTask, match="larger than OUTBOX_MAX_PAYLOAD_BYTES"),
    ):
        tasks.add.enqueue(shared, 1)  # type: ignore[arg-type]


def test_enqueue__refuses_a_task_a_worker_cannot_find_by_its_path() -> None:
    with pytest.raises(InvalidTask, match="that name holds something else"):
        tasks.renamed.enqueue()

    assert not OutboxEvent.objects.exists()


def test_enqueue__refuses_priority_which_the_claim_cannot_order_by() -> None:
    with pytest.raises(InvalidTask, match="priority"):
        tasks.add.using(priority=10)


# -- running: results, errors, retries ---------------------------------------


def test_get_result__shows_a_successful_task_with_its_return_value() -> None:
    before = timezone.now() - datetime.timedelta(seconds=1)  # SQLite: ms
    result = tasks.add.enqueue(2, 3)

    drain()

    found = tasks.add.get_result(result.id)
    assert found.status == TaskResultStatus.SUCCESSFUL
    assert found.return_value == 5
    assert found.args == [2, 3]
    assert found.attempts == 1
    assert found.worker_ids == ["outbox-testing-drain"]
    assert found.errors == []
    assert found.enqueued_at is not None
    assert found.started_at is not None
    assert found.last_attempted_at == found.started_at
    assert found.finished_at is not None
    assert before <= found.enqueued_at <= found.started_at <= found.finished_at
    assert event_of(result).result == 5


def test_run__writes_the_result_with_the_tasks_own_writes() -> None:
    result = tasks.record_then_return.enqueue("both")

    drain()

    found = result.task.get_result(result.id)
    # Tuples come back as lists, as from any JSON.
    assert found.return_value == {"label": "both", "tuple": [1, 2]}
    assert HandlerRun.objects.filter(worker="both").count() == 1


def test_run__a_task_that_writes_nothing_costs_what_an_event_costs(
    register_handler: Any,
) -> None:
    """No query of its own (its history, say): its completion joins the batch's."""
    register_handler("x", lambda event: None)

    def statements_to_drain() -> list[str]:
        with CaptureQueriesContext(connection) as queries:
            drain()
        return [query["sql"].split()[0] for query in queries.captured_queries]

    from outbox import publish

    drain()  # the claim's SQL is compiled once per process: not in what is compared
    publish("x", {})
    for_an_event = statements_to_drain()
    tasks.noop.enqueue()
    for_a_task = statements_to_drain()

    assert for_a_task == for_an_event


def test_result__refresh_reads_the_new_state() -> None:
    result = tasks.add.enqueue(1, 1)
    assert not result.is_finished

    drain()
    result.refresh()

    assert result.status == TaskResultStatus.SUCCESSFUL
    assert result.return_value == 2


def test_run__retries_a_task_that_raises_with_the_errors_of_each_attempt() -> None:
    result = tasks.attempt_number.enqueue()

    run_until_done()

    found = tasks.attempt_number.get_result(result.id)
    assert found.status == TaskResultStatus.SUCCESSFUL
    # The context's attempt: the third run succeeded, and said so.
    assert found.return_value == 3
    assert found.attempts == 3
    assert [error.exception_class_path for error in found.errors] == [
        "builtins.ConnectionError",
        "builtins.ConnectionError",
    ]
    assert found.errors[0].exception_class is ConnectionError
    assert "attempt 1 failed" in found.errors[0].traceback
    assert 'raise ConnectionError(f"attempt {context.attempt} failed")' in (
        found.errors[0].traceback
    )


def test_run__a_task_that_always_raises_ends_failed_after_max_attempts() -> None:
    result = options(tasks.always_fails).using(max_attempts=3).enqueue()

    run_until_done()

    found = tasks.always_fails.get_result(result.id)
    assert found.status == TaskResultStatus.FAILED
    assert found.attempts == 3
    assert len(found.errors) == 3
    assert found.errors[-1].exception_class_path == "builtins.ValueError"
    assert "this task always fails" in found.errors[-1].traceback
    assert found.finished_at is not None
    with pytest.raises(ValueError, match="Task failed"):
        found.return_value  # noqa: B018 - the property raises


def test_run__permanent_failure_ends_the_task_at_once() -> None:
    result = tasks.gives_up.enqueue()

    drain()

    found = tasks.gives_up.get_result(result.id)
    assert found.status == TaskResultStatus.FAILED
    assert found.attempts == 1
    assert found.errors[0].exception_class_path == "outbox.errors.PermanentFailure"


def test_run__retry_sets_the_next_attempts_time() -> None:
    result = tasks.retry_in_an_hour.enqueue()

    drain()

    event = event_of(result)
    found = tasks.retry_in_an_hour.get_result(result.id)
    assert found.status == TaskResultStatus.READY
    assert found.errors[0].exception_class_path == "outbox.errors.Retry"
    assert event.available_at > timezone.now() + datetime.timedelta(minutes=59)


def test_run__a_return_value_json_cannot_hold_fails_the_task_for_good() -> None:
    result = tasks.returns_a_datetime.enqueue()

    drain()

    found = tasks.returns_a_datetime.get_result(result.id)
    assert found.status == TaskResultStatus.FAILED
    assert found.attempts == 1
    assert "returned a value the outbox cannot keep" in found.errors[0].traceback
    assert "return value is a datetime" in found.errors[0].traceback


def test_run__async_task() -> None:
    result = tasks.async_add.enqueue(20, 22)

    drain()

    assert tasks.async_add.get_result(result.id).return_value == 42


def test_operator_retry__starts_the_tasks_attempts_afresh() -> None:
    from outbox.operations import retry_events

    result = tasks.gives_up.enqueue()
    drain()
    retry_events(OutboxEvent.objects.all(), actor="ops")

    found = tasks.gives_up.get_result(result.id)

    assert found.status == TaskResultStatus.READY
    assert found.errors == []
    assert found.worker_ids == []
    assert (found.started_at, found.last_attempted_at) == (None, None)


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("tests.outbox_app.gone", "ImportError: No task at 'tests.outbox_app.gone'"),
        ("outbox.tasks.PATH_LIMIT", "TypeError: 'outbox.tasks.PATH_LIMIT' is a int"),
    ],
)
def test_run__a_path_that_is_no_task_is_retried_with_the_reason(
    path: str, error: str
) -> None:
    """A worker that has not been deployed with the task yet may come later."""
    from outbox import publish

    event = publish(f"task:{path}", {"args": [], "kwargs": {}, "backend": "default"})

    assert drain().retried == 1

    event.refresh_from_db()
    assert event.last_error.startswith(error)


# -- deferral, options, queues -------------------------------------------------


def test_run_after__defers_the_task() -> None:
    later = timezone.now() + datetime.timedelta(hours=1)
    result = tasks.add.using(run_after=later).enqueue(1, 2)

    drain()

    found = tasks.add.get_result(result.id)
    assert found.status == TaskResultStatus.READY
    assert found.task.run_after == later
    assert event_of(result).available_at == later


def test_task_options__key_and_max_attempts_from_the_decorator_and_using() -> None:
    first = tasks.keyed_report.enqueue(1)
    second = options(tasks.keyed_report).using(max_attempts=7).enqueue(2)
    other = options(tasks.add).using(key="org:1").enqueue(1, 1)

    assert (event_of(first).key, event_of(first).max_attempts) == ("reports", 2)
    assert (event_of(second).key, event_of(second).max_attempts) == ("reports", 7)
    assert event_of(second).waiting  # behind the first of its key
    assert event_of(other).key == "org:1"
    drain()
    assert list(HandlerRun.objects.order_by("id").values_list("worker", flat=True)) == [
        "report-1",
        "report-2",
    ]


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"key": "k" * 201}, "Task key is 201 characters long"),
        ({"key": "a\x00"}, "Task key contains"),
        ({"max_attempts": 0}, "max_attempts must be a whole number"),
        ({"queue_name": "nope"}, "Queue 'nope' is not valid"),
    ],
)
def test_task_options__bad_values_are_refused(
    options: dict[str, Any], named: str
) -> None:
    with pytest.raises(InvalidTask, match=re.escape(named)):
        tasks.add.using(**options)


def test_backend_options__max_attempts_is_the_default_for_its_tasks() -> None:
    setting = {
        "default": {
            "BACKEND": "outbox.tasks.OutboxTaskBackend",
            "QUEUES": [],
            "OPTIONS": {"max_attempts": 4},
        }
    }
    with override_settings(TASKS=setting):
        result = tasks.add.enqueue(1, 1)

    assert event_of(result).max_attempts == 4


def test_queues__a_worker_runs_only_its_queues() -> None:
    reports = tasks.in_reports_queue.enqueue(1)
    default = tasks.add.enqueue(1, 1)

    Worker(worker_id="reports-only", queues=["reports"]).run(drain=True)

    assert event_of(reports).status == Status.COMPLETED
    assert event_of(default).status == Status.PENDING
    Worker(worker_id="all").run(drain=True)
    assert event_of(default).status == Status.COMPLETED


# -- get_result ---------------------------------------------------------------


@pytest.mark.parametrize("result_id", ["not-a-uuid", str(uuid.uuid4())])
def test_get_result__of_no_task_raises_does_not_exist(result_id: str) -> None:
    with pytest.raises(TaskResultDoesNotExist):
        default_task_backend.get_result(result_id)


def test_get_result__of_an_event_that_is_no_task_raises_does_not_exist() -> None:
    from outbox import publish

    event = publish("outbox_testapp.record", {})

    with pytest.raises(TaskResultDoesNotExist):
        default_task_backend.get_result(str(event.uuid))


ADD = "task:tests.outbox_app.tasks.add"


@pytest.mark.parametrize(
    ("event_type", "payload"),
    [
        (
            "task:tests.outbox_app.gone",
            {"args": [], "kwargs": {}, "backend": "default"},
        ),
        (ADD, ["not", "an", "object"]),
        (ADD, {"kwargs": {}, "backend": "default"}),
        (ADD, {"args": [], "kwargs": {}, "backend": "elsewhere"}),
    ],
    ids=["no-longer-imports", "not-an-object", "no-args", "other-backend"],
)
def test_get_result__of_an_event_it_cannot_read_raises_does_not_exist(
    event_type: str, payload: Any
) -> None:
    from outbox import publish

    event = publish(event_type, payload)

    with pytest.raises(TaskResultDoesNotExist):
        default_task_backend.get_result(str(event.uuid))


def test_get_result__of_a_task_whose_queue_was_since_removed() -> None:
    result = tasks.in_reports_queue.enqueue(1)
    setting = {
        "default": {"BACKEND": "outbox.tasks.OutboxTaskBackend", "QUEUES": ["default"]}
    }

    with override_settings(TASKS=setting):
        found = default_task_backend.get_result(result.id)
        drain()
        done = default_task_backend.get_result(result.id)

    assert found.task.queue_name == "reports"
    assert done.return_value == 1


def test_get_result__counts_every_attempt_past_the_historys_limit() -> None:
    result = options(tasks.always_fails).using(max_attempts=30).enqueue()

    run_until_done(limit=40)

    found = tasks.always_fails.get_result(result.id)
    assert found.status == TaskResultStatus.FAILED
    assert found.attempts == 30
    assert len(found.errors) == 25  # the history keeps the last 25
    assert found.worker_ids[:5] == [""] * 5


def test_get_result__through_another_task_raises_mismatch() -> None:
    result = tasks.add.enqueue(1, 2)

    with pytest.raises(TaskResultMismatch):
        tasks.noop.get_result(result.id)


# -- signals ------------------------------------------------------------------


def test_signals__enqueued_at_commit_then_started_and_finished(
    django_capture_on_commit_callbacks: Any,
) -> None:
    seen: list[tuple[str, str]] = []

    def receiver(signal: Any, sender: Any, task_result: Any, **kwargs: Any) -> None:
        assert sender is OutboxTaskBackend
        seen.append((signal_names[signal], task_result.status))

    signal_names = {
        task_enqueued: "enqueued",
        task_started: "started",
        task_finished: "finished",
    }
    for signal in signal_names:
        signal.connect(receiver)
    try:
        with transaction.atomic():
            with django_capture_on_commit_callbacks(execute=True):
                tasks.add.enqueue(1, 2)
                assert seen == []  # nothing before the commit
        with django_capture_on_commit_callbacks(execute=True):
            drain()
        options(tasks.always_fails).using(max_attempts=1).enqueue()
        with django_capture_on_commit_callbacks(execute=True):
            drain()
    finally:
        for signal in signal_names:
            signal.disconnect(receiver)

    assert seen == [
        ("enqueued", TaskResultStatus.READY),
        ("started", TaskResultStatus.RUNNING),
        ("finished", TaskResultStatus.SUCCESSFUL),
        ("started", TaskResultStatus.RUNNING),
        ("finished", TaskResultStatus.FAILED),
    ]


def test_signals__no_task_enqueued_for_a_rolled_back_task(
    django_capture_on_commit_callbacks: Any,
) -> None:
    seen: list[Any] = []

    def receiver(task_result: Any, **kwargs: Any) -> None:
        seen.append(task_result)

    task_enqueued.connect(receiver)
    try:
        with django_capture_on_commit_callbacks(execute=True):
            with pytest.raises(RuntimeError), transaction.atomic():
                tasks.add.enqueue(1, 2)
                raise RuntimeError
            tasks.add.enqueue(3, 4)
    finally:
        task_enqueued.disconnect(receiver)

    assert [result.args for result in seen] == [[3, 4]]


def test_signals__finished_only_once_a_retried_task_ends(
    django_capture_on_commit_callbacks: Any,
) -> None:
    finished: list[Any] = []

    def receiver(task_result: Any, **kwargs: Any) -> None:
        finished.append((task_result.status, task_result._return_value))

    task_finished.connect(receiver)
    try:
        tasks.attempt_number.enqueue()
        with django_capture_on_commit_callbacks(execute=True):
            run_until_done()
    finally:
        task_finished.disconnect(receiver)

    assert finished == [(TaskResultStatus.SUCCESSFUL, 3)]


def test_signals__a_task_failed_by_the_rescue_is_finished_too(
    django_capture_on_commit_callbacks: Any,
) -> None:
    """Its worker was killed during its last attempt: the rescue ends it."""
    finished: list[Any] = []

    def receiver(task_result: Any, **kwargs: Any) -> None:
        finished.append(task_result)

    result = options(tasks.add).using(max_attempts=1).enqueue(1, 2)
    OutboxEvent.objects.filter(uuid=result.id).update(
        status=Status.PROCESSING,
        attempts=1,
        locked_by="killed",
        lease_token=1,
        locked_until=timezone.now() - datetime.timedelta(minutes=1),
    )
    task_finished.connect(receiver)
    try:
        with django_capture_on_commit_callbacks(execute=True):
            assert Worker(worker_id="rescuer").rescue_expired() == 1
    finally:
        task_finished.disconnect(receiver)

    [ended] = finished
    assert ended.status == TaskResultStatus.FAILED
    assert ended.worker_ids == ["killed"]
    assert ended.errors[0].exception_class_path == "outbox.errors.LeaseExpired"
    assert ended.finished_at is not None


def test_signals__a_failed_tasks_traceback_is_redacted_for_receivers(
    django_capture_on_commit_callbacks: Any,
) -> None:
    finished: list[Any] = []

    def receiver(task_result: Any, **kwargs: Any) -> None:
        finished.append(task_result)

    options(tasks.refused).using(max_attempts=1).enqueue("alice@example.com")
    task_finished.connect(receiver)
    try:
        with django_capture_on_commit_callbacks(execute=True):
            drain()
    finally:
        task_finished.disconnect(receiver)

    [ended] = finished
    assert "the server refused <email>" in ended.errors[-1].traceback
    assert "alice@example.com" not in ended.errors[-1].traceback


def test_signals__nothing_finished_before_the_turn_commits() -> None:
    """In a test's transaction nothing commits: drain() sends no task_finished."""
    finished: list[Any] = []

    def receiver(task_result: Any, **kwargs: Any) -> None:
        finished.append(task_result)

    task_finished.connect(receiver)
    try:
        tasks.add.enqueue(1, 2)
        drain()
    finally:
        task_finished.disconnect(receiver)

    assert finished == []


# -- configuration ------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "error_id", "named"),
    [
        ({"OPTIONS": {"retries": 3}}, "outbox.E011", "['retries'] is not an option"),
        ({"OPTIONS": {"max_attempts": 0}}, "outbox.E012", "['max_attempts']"),
        ({"QUEUES": ["q" * 201]}, "outbox.E013", "201 characters long"),
        ({"OPTIONS": "max_attempts=3"}, "outbox.E011", "['OPTIONS'] must be a dict"),
    ],
)
def test_check__names_the_bad_setting(
    params: dict[str, Any], error_id: str, named: str
) -> None:
    backend = OutboxTaskBackend("custom", params)

    errors = backend.check()

    assert [error.id for error in errors] == [error_id]
    assert "settings.TASKS['custom']" in errors[0].msg
    assert named in errors[0].msg


def test_check__fails_manage_py_check() -> None:
    from django.core.management.base import SystemCheckError

    setting = {
        "default": {
            "BACKEND": "outbox.tasks.OutboxTaskBackend",
            "OPTIONS": {"max_attempts": "ten"},
        }
    }
    with override_settings(TASKS=setting), pytest.raises(SystemCheckError) as raised:
        call_command("check")

    assert "outbox.E012" in str(raised.value)


def test_enqueue__with_a_bad_backend_option_raises_naming_it() -> None:
    from django.core.exceptions import ImproperlyConfigured

    setting = {
        "default": {
            "BACKEND": "outbox.tasks.OutboxTaskBackend",
            "OPTIONS": {"max_attempts": -1},
        }
    }
    with (
        override_settings(TASKS=setting),
        pytest.raises(ImproperlyConfigured, match=re.escape("['max_attempts']")),
    ):
        tasks.add.enqueue(1, 2)

    assert not OutboxEvent.objects.exists()


def test_check__a_valid_configuration_passes() -> None:
    assert task_backends["default"].check() == []


# -- the admin ----------------------------------------------------------------


def test_admin__shows_a_tasks_queue_arguments_result_and_tracebacks(
    admin_client: Any,
) -> None:
    done = tasks.in_reports_queue.enqueue(7)
    failed = options(tasks.always_fails).using(max_attempts=1).enqueue()
    drain()

    page = admin_client.get(
        reverse("admin:outbox_outboxevent_change", args=[event_of(done).pk])
    ).content.decode()
    failed_page = admin_client.get(
        reverse("admin:outbox_outboxevent_change", args=[event_of(failed).pk])
    ).content.decode()

    assert "task:tests.outbox_app.tasks.in_reports_queue" in page
    assert "reports" in page
    assert '<pre class="outbox-result">7</pre>' in page
    assert "None yet" in failed_page
    assert '<details class="outbox-traceback">' in failed_page
    assert "raise ValueError(&quot;this task always fails&quot;)" in failed_page
