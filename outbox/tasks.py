"""A django.tasks backend on the outbox: a task enqueued in a transaction
commits or rolls back with it.

    TASKS = {
        "default": {
            "BACKEND": "outbox.tasks.OutboxTaskBackend",
            "QUEUES": ["default", "emails"],
            "OPTIONS": {"max_attempts": 5},
        }
    }

enqueue() is publish(): the task becomes an outbox event named "task:" and
the function's dotted path, with payload {"args", "kwargs", "backend"} (and
"run_after", if set), in the task's queue, available at its run_after. It
is written in the caller's transaction (in autocommit, committed at once)
and wakes the workers at commit. run_outbox_worker runs tasks and events
alike: run_task() handles every "task:" event, with the outbox's retries
and backoff, leases, per-key order (a task's key), admin and pruning.

get_result() reads the task's event back: its status (pending READY,
processing RUNNING, completed SUCCESSFUL, failed FAILED), its attempts'
errors and workers from the history, and the JSON return value, which the
worker writes in the task's own transaction, so a task's database writes,
its result and its completion commit together.

supports_priority is off. Ordering the claim by priority first puts the
priority ahead of available_at in the index, and PostgreSQL (before 18)
cannot skip within an index: every claim would then step over every
deferred event (a run_after to come, a retry waiting out its backoff) of
the priorities above the one it serves, where today it reads none of them.

Needs Django 6.0 or later (django.tasks); the rest of the outbox runs on
Django 5.2.
"""

import functools
import logging
import math
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from datetime import datetime
from traceback import format_exception
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

from django.apps import apps
from django.core.checks import CheckMessage, Error
from django.core.exceptions import ImproperlyConfigured
from django.db import router, transaction
from django.tasks import Task, TaskContext, TaskResult, TaskResultStatus
from django.tasks.backends.base import BaseTaskBackend
from django.tasks.base import TaskError
from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist
from django.tasks.signals import task_enqueued, task_finished, task_started
from django.utils import timezone
from django.utils.module_loading import import_string

from outbox.conf import check_queue_name, get_settings
from outbox.errors import PermanentFailure
from outbox.handling import gives_up
from outbox.models import OutboxEvent, Status
from outbox.publishing import MAX_ATTEMPTS_LIMIT, publish
from outbox.redaction import redact
from outbox.registry import TASK_EVENT_PREFIX
from outbox.storable import check_text, encode_json

__all__ = ["OutboxTask", "OutboxTaskBackend", "run_task", "task_ended"]

logger = logging.getLogger(__name__)

#: The longest task path: the event type is varchar(200), prefix included.
PATH_LIMIT = 200 - len(TASK_EVENT_PREFIX)
#: Deeper arguments are refused (a cycle would never end).
NESTING_LIMIT = 100
#: Floats from here up are whole numbers that jsonb writes out in full and
#: json.loads reads back as ints.
FLOAT_LIMIT = 1e16
OPTIONS = ("max_attempts",)

_STATUSES = {
    Status.PENDING: TaskResultStatus.READY,
    Status.PROCESSING: TaskResultStatus.RUNNING,
    Status.COMPLETED: TaskResultStatus.SUCCESSFUL,
    Status.FAILED: TaskResultStatus.FAILED,
}

_P = ParamSpec("_P")
_R = TypeVar("_R")

if TYPE_CHECKING:
    _Task = Task[..., Any]
    _TaskResult = TaskResult[..., Any]
else:
    _Task = Task
    _TaskResult = TaskResult


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxTask(_Task):
    """A Task with the outbox's options: @task(key=..., max_attempts=...).

    key: tasks with the same key run one at a time, in enqueue order.
    max_attempts: attempts before the task ends FAILED (default: the
    backend's OPTIONS, then OUTBOX_MAX_ATTEMPTS).
    """

    key: str | None = None
    max_attempts: int | None = None

    def using(
        self,
        *,
        priority: int | None = None,
        queue_name: str | None = None,
        run_after: datetime | None = None,
        backend: str | None = None,
        key: str | None = None,
        max_attempts: int | None = None,
    ) -> "OutboxTask":
        """Return a copy with these defaults changed, the outbox's included."""
        # Task.using, not super(): a slotted dataclass is a new class, which
        # super() without arguments does not find.
        task = Task.using(
            self,
            priority=priority,
            queue_name=queue_name,
            run_after=run_after,
            backend=backend,
        )
        changes: dict[str, Any] = {}
        if key is not None:
            changes["key"] = key
        if max_attempts is not None:
            changes["max_attempts"] = max_attempts
        return replace(task, **changes) if changes else task  # type: ignore[return-value]


class OutboxTaskBackend(BaseTaskBackend):
    """Tasks as outbox events: transactional enqueue, run by run_outbox_worker."""

    task_class = OutboxTask
    supports_defer = True
    supports_async_task = True
    supports_get_result = True
    supports_priority = False  # see the module's docstring

    def validate_task(self, task: _Task) -> None:
        super().validate_task(task)
        path = task.module_path
        if len(path) > PATH_LIMIT:
            raise InvalidTask(
                f"Task path {path!r} is {len(path)} characters long; the outbox "
                f"keeps at most {PATH_LIMIT}."
            )
        _invalid_unless(check_queue_name, task.queue_name, name="Task queue_name")
        key = getattr(task, "key", None)
        if key is not None:
            _invalid_unless(check_text, key, name="Task key", limit=200)
        max_attempts = getattr(task, "max_attempts", None)
        if max_attempts is not None and not _attempts_in_range(max_attempts):
            raise InvalidTask(
                f"Task max_attempts must be a whole number from 1 to "
                f"{MAX_ATTEMPTS_LIMIT}, not {max_attempts!r}."
            )

    def enqueue(
        self, task: "Task[_P, _R]", args: list[Any], kwargs: dict[str, Any]
    ) -> "TaskResult[_P, _R]":
        """Write the task in the caller's transaction; return its READY result."""
        self.validate_task(task)
        # Here, not in validate_task(): @task validates before the module
        # has the name bound.
        problem = _unfindable(task.module_path, task.func)
        if problem:
            raise InvalidTask(
                f"Task {task.module_path!r} cannot be found by a worker: "
                f"{problem}. Define it at a module's top level with @task, "
                "under its function's own name."
            )
        payload = {
            "args": _json_arguments(list(args), "args"),
            "kwargs": _json_arguments(dict(kwargs), "kwargs"),
            "backend": self.alias,
        }
        if task.run_after is not None:
            # The event's available_at moves with its retries; this stays.
            payload["run_after"] = task.run_after.isoformat()
        try:
            # publish() encodes the payload once and refuses, before any
            # query, what the column cannot store (NUL, size): the task's
            # fields were validated above, so what it refuses is the arguments.
            event = publish(
                TASK_EVENT_PREFIX + task.module_path,
                payload,
                key=getattr(task, "key", None),
                max_attempts=getattr(task, "max_attempts", None)
                or self._default_max_attempts(),
                available_at=task.run_after,
                queue=task.queue_name,
            )
        except (TypeError, ValueError) as error:
            raise InvalidTask(f"Task arguments: {error}") from None
        result = cast("TaskResult[_P, _R]", task_result(event, task))
        # Once it exists for others: never for a transaction rolled back.
        transaction.on_commit(
            functools.partial(task_enqueued.send, type(self), task_result=result),
            using=event._state.db,
            robust=True,
        )
        return result

    def get_result(self, result_id: str) -> _TaskResult:
        """Read the task back from its event; TaskResultDoesNotExist if none."""
        try:
            public_id = uuid.UUID(str(result_id))
        except ValueError:
            raise TaskResultDoesNotExist(result_id) from None
        event = (
            OutboxEvent.objects.using(router.db_for_read(OutboxEvent))
            .filter(uuid=public_id, event_type__startswith=TASK_EVENT_PREFIX)
            .first()
        )
        if event is None or not _is_task_payload(event.payload, self.alias):
            raise TaskResultDoesNotExist(result_id)
        try:
            task = _task_of(event)
        except (ImportError, TypeError, ValueError) as error:
            raise TaskResultDoesNotExist(f"{result_id}: {error}") from error
        return task_result(event, task)

    def check(self, **kwargs: Any) -> list[CheckMessage]:
        where = f"settings.TASKS[{self.alias!r}]"
        errors = list(super().check(**kwargs))
        if not apps.is_installed("outbox"):
            errors.append(
                Error(
                    f"{where} uses outbox.tasks.OutboxTaskBackend, but 'outbox' "
                    "is not in INSTALLED_APPS.",
                    id="outbox.E010",
                )
            )
        if not isinstance(self.options, dict):
            return [
                *errors,
                Error(f"{where}['OPTIONS'] must be a dict.", id="outbox.E011"),
            ]
        for name in sorted(set(self.options) - set(OPTIONS)):
            errors.append(
                Error(
                    f"{where}['OPTIONS'][{name!r}] is not an option of "
                    f"OutboxTaskBackend: expected one of {', '.join(OPTIONS)}.",
                    id="outbox.E011",
                )
            )
        if "max_attempts" in self.options and not _attempts_in_range(
            self.options["max_attempts"]
        ):
            errors.append(
                Error(
                    f"{where}['OPTIONS']['max_attempts'] must be a whole number "
                    f"from 1 to {MAX_ATTEMPTS_LIMIT}, got "
                    f"{self.options['max_attempts']!r}.",
                    id="outbox.E012",
                )
            )
        for queue in sorted(self.queues, key=str):
            try:
                check_queue_name(queue, name=f"{where}['QUEUES'] entry {queue!r}")
            except (TypeError, ValueError) as error:
                errors.append(Error(str(error), id="outbox.E013"))
        return errors

    def _default_max_attempts(self) -> int | None:
        if not isinstance(self.options, dict):
            raise ImproperlyConfigured(
                f"settings.TASKS[{self.alias!r}]['OPTIONS'] must be a dict."
            )
        value = self.options.get("max_attempts")
        if value is not None and not _attempts_in_range(value):
            raise ImproperlyConfigured(
                f"settings.TASKS[{self.alias!r}]['OPTIONS']['max_attempts'] must "
                f"be a whole number from 1 to {MAX_ATTEMPTS_LIMIT}."
            )
        return value


# -- running a task: the handler of every "task:" event ----------------------


def run_task(event: OutboxEvent) -> None:
    """Run the event's task, in the worker's transaction for it.

    Sends task_started first. A return value is written to the event,
    fenced on the claim's token, so it commits with the task's own writes
    and its completion. task_finished waits for the task's end to commit
    (task_ended()): a commit that fails, a lease lost, or an attempt that
    will be retried sends none.
    """
    task = _task_of(event)
    sender = type(task.get_backend())
    running = task_result(event, task)
    task_started.send(sender, task_result=running)
    payload = event.payload
    try:
        if task.takes_context:
            context = TaskContext(task_result=running)
            value = task.call(context, *payload["args"], **payload["kwargs"])
        else:
            value = task.call(*payload["args"], **payload["kwargs"])
        value = _json_return_value(task, value)
    except Exception as error:
        if gives_up(event, error):
            _keep_for_the_end(
                event,
                replace(
                    running,
                    status=TaskResultStatus.FAILED,
                    finished_at=timezone.now(),
                    errors=[*running.errors, _task_error(error)],
                ),
            )
        raise
    if value is not None:
        OutboxEvent.objects.using(event._state.db).filter(
            pk=event.pk, lease_token=event.lease_token, status=Status.PROCESSING
        ).update(result=value)
    succeeded = replace(
        running, status=TaskResultStatus.SUCCESSFUL, finished_at=timezone.now()
    )
    object.__setattr__(succeeded, "_return_value", value)
    _keep_for_the_end(event, succeeded)


#: The attribute of a claimed event where run_task() leaves the result that
#: task_ended() sends.
_ENDED_RESULT = "_outbox_task_result"


def _keep_for_the_end(event: OutboxEvent, result: _TaskResult) -> None:
    setattr(event, _ENDED_RESULT, result)


def task_ended(event: OutboxEvent) -> None:
    """Send task_finished for a task whose end (completed or failed) committed.

    The worker calls it after the commit (recording.after_end): with the
    result run_task() built, or, for an end decided elsewhere (the rescue
    of a worker killed during the last attempt, a task that could not be
    imported), one read from the event.
    """
    result = getattr(event, _ENDED_RESULT, None)
    if result is None or result.status != _STATUSES[Status(event.status)]:
        # Decided after the run: its COMMIT failed, say, so the success it
        # left here never happened.
        try:
            result = replace(
                task_result(event, _task_of(event)), finished_at=timezone.now()
            )
        except Exception:  # no task to describe (its path no longer imports)
            logger.warning(
                "outbox task %s ended %s; no task_finished: its task cannot be loaded",
                event.pk,
                event.status,
                extra=event.describe(),
            )
            return
    task_finished.send(type(result.task.get_backend()), task_result=result)


def task_result(event: OutboxEvent, task: _Task) -> _TaskResult:
    """Return the TaskResult the event stands for."""
    attempts = _attempts_since_reopened(_history(event))
    worker_ids = [str(entry.get("worker", "")) for entry in attempts]
    if event.status in (Status.PROCESSING, Status.COMPLETED) and event.locked_by:
        worker_ids.append(event.locked_by)
    # The history keeps the last 25 entries: attempts before them ran on
    # workers no longer recorded, and still count.
    worker_ids = [""] * (event.attempts - len(worker_ids)) + worker_ids
    finished_at = {
        Status.COMPLETED: event.completed_at,
        Status.FAILED: event.failed_at,
    }.get(Status(event.status))
    payload = event.payload
    result = TaskResult(
        task=task,
        id=str(event.uuid),
        status=_STATUSES[Status(event.status)],
        enqueued_at=event.created_at,
        started_at=event.started_at,
        finished_at=finished_at,
        last_attempted_at=event.last_attempted_at,
        args=payload["args"],
        kwargs=payload["kwargs"],
        backend=payload["backend"],
        errors=[_recorded_error(entry) for entry in attempts],
        worker_ids=worker_ids,
    )
    if event.status == Status.COMPLETED:
        object.__setattr__(result, "_return_value", event.result)
    return result


def _task_of(event: OutboxEvent) -> _Task:
    path = event.event_type.removeprefix(TASK_EVENT_PREFIX)
    task = _task(path, event.payload["backend"], event.queue_name)
    if run_after := event.payload.get("run_after"):
        return _as_stored(task, run_after=datetime.fromisoformat(run_after))
    return task


@functools.lru_cache(maxsize=1024)
def _task(path: str, backend: str, queue_name: str) -> _Task:
    try:
        found = import_string(path)
    except ImportError as error:
        raise ImportError(f"No task at {path!r}: {error}") from error
    if not isinstance(found, Task):
        raise TypeError(f"{path!r} is a {type(found).__name__}, not a Task.")
    return _as_stored(found, backend=backend, queue_name=queue_name)


def _as_stored(task: _Task, **stored: Any) -> _Task:
    """The task with what its event stored, not validated again.

    It was valid when enqueued; using() would check it against today's
    settings (a queue since removed from QUEUES), and a task that ran, or
    waits, must still run and be read back.
    """
    copy = object.__new__(type(task))
    for field in fields(task):
        value = stored.get(field.name, getattr(task, field.name))
        object.__setattr__(copy, field.name, value)
    return copy


#: (path, function) of the tasks found by their path: asked once each.
_FOUND: set[tuple[str, Any]] = set()


def _unfindable(path: str, function: Any) -> str:
    """Why a worker could not find this task by its path; "" if it can.

    Only a success is remembered: a failure (a module half imported) is
    asked again at the next enqueue.
    """
    if (path, function) in _FOUND:
        return ""
    if path.startswith("__main__."):
        return "it is defined in __main__, which a worker does not import"
    try:
        found = import_string(path)
    except ImportError:
        return "its path does not import"
    if not isinstance(found, Task) or found.func is not function:
        return "that name holds something else"
    _FOUND.add((path, function))
    return ""


def _is_task_payload(payload: Any, alias: str) -> bool:
    return (
        isinstance(payload, dict)
        and payload.get("backend") == alias
        and isinstance(payload.get("args"), list)
        and isinstance(payload.get("kwargs"), dict)
    )


def _history(event: OutboxEvent) -> list[dict[str, Any]]:
    """The event's history, read only if it can hold an attempt's error.

    The claim leaves the history out (statements.py); reading it inside the
    task's transaction would cost a query, and the commit it then needs, for
    every task. On a first attempt since the event was published or last
    retried by an operator there is no failed attempt to show.
    """
    if "history" in event.get_deferred_fields() and event.attempts <= 1:
        return []
    return event.history


def _attempts_since_reopened(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The history's failed attempts since an operator last retried the event."""
    attempts: list[dict[str, Any]] = []
    for entry in history:
        if entry.get("action") == "retried":
            attempts = []
        elif "attempt" in entry:
            attempts.append(entry)
    return attempts


def _recorded_error(entry: dict[str, Any]) -> TaskError:
    name = str(entry.get("error", ""))
    path = name if "." in name else f"builtins.{name}"
    traceback = entry.get("traceback") or f"{name}: {entry.get('message', '')}\n"
    return TaskError(exception_class_path=path, traceback=traceback)


def _task_error(error: BaseException) -> TaskError:
    cls = type(error)
    return TaskError(
        exception_class_path=f"{cls.__module__}.{cls.__qualname__}",
        # As the history keeps it: no address or quoted value for receivers.
        traceback=redact("".join(format_exception(error))),
    )


# -- what JSON can carry -----------------------------------------------------


def _json_arguments(value: Any, where: str) -> Any:
    """Return the arguments if they come back from JSON as they went in."""
    _check_round_trip(value, where)
    return value


def _json_return_value(task: _Task, value: Any) -> Any:
    """Return the task's return value as it will be stored; give up if it can't."""
    try:
        _check_round_trip(value, "return value")
        encode_json(
            value,
            name="The return value",
            max_bytes=get_settings().max_payload_bytes,
        )
    except (InvalidTask, TypeError, ValueError) as error:
        raise PermanentFailure(
            f"{task.module_path} returned a value the outbox cannot keep: {error}"
        ) from error
    return _normalized(value)


class _NotJSON(Exception):  # noqa: N818 - internal, turned into InvalidTask
    """A value that does not round-trip; path is filled in on the way out."""

    def __init__(self, problem: str, *, located: bool = True) -> None:
        super().__init__(problem)
        self.problem = problem
        self.located = located
        self.path: list[str] = []


def _check_round_trip(value: Any, where: str) -> None:
    """Raise InvalidTask, naming the place, unless value survives JSON unchanged.

    The walk counts the values it visits against OUTBOX_MAX_PAYLOAD_BYTES
    (each costs a byte at least), so arguments that share one list many
    times over are refused in time instead of expanding for minutes.
    """
    limit = get_settings().max_payload_bytes
    try:
        _walk(value, 0, [limit])
    except _NotJSON as error:
        place = "".join(reversed(error.path)) if error.located else ""
        raise InvalidTask(f"Task {where}{place} {error.problem}.") from None


def _walk(value: Any, depth: int, budget: list[int]) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        raise _NotJSON("is larger than OUTBOX_MAX_PAYLOAD_BYTES as JSON", located=False)
    if depth > NESTING_LIMIT:
        raise _NotJSON(f"is nested more than {NESTING_LIMIT} levels deep")
    match value:
        case None | bool() | int() | str():
            return
        case float():
            _check_float(value)
        case dict():
            _walk_items(_string_keyed(value), depth, budget)
        case list() | tuple():
            _walk_items(enumerate(value), depth, budget)
        case _:
            raise _NotJSON(
                f"is a {type(value).__qualname__}, which does not round-trip "
                "through JSON: pass strings, numbers, booleans, None, lists "
                "and dicts with string keys (an id, not a model instance; an "
                "ISO string, not a datetime)"
            )


def _walk_items(
    items: Iterable[tuple[int | str, Any]], depth: int, budget: list[int]
) -> None:
    for key, item in items:
        try:
            _walk(item, depth + 1, budget)
        except _NotJSON as error:
            error.path.append(f"[{key!r}]")
            raise


def _string_keyed(value: dict[Any, Any]) -> Iterable[tuple[str, Any]]:
    for name in value:
        if not isinstance(name, str):
            raise _NotJSON(
                f"has the key {name!r}: JSON keys are strings, so it would "
                f"come back as {str(name)!r}"
            )
    return value.items()


def _check_float(value: float) -> None:
    if not math.isfinite(value):
        raise _NotJSON(f"is {value!r}, which JSON cannot carry")
    if abs(value) >= FLOAT_LIMIT:
        raise _NotJSON(
            f"is {value!r}, which PostgreSQL's jsonb returns as the integer "
            f"{int(value)}: pass an int, or a string"
        )


def _normalized(value: Any) -> Any:
    """Tuples as lists, as the value comes back from the database."""
    if isinstance(value, dict):
        return {name: _normalized(item) for name, item in value.items()}
    if isinstance(value, list | tuple):
        return [_normalized(item) for item in value]
    return value


def _invalid_unless(check: Any, value: Any, **arguments: Any) -> None:
    try:
        check(value, **arguments)
    except (TypeError, ValueError) as error:
        raise InvalidTask(str(error)) from None


def _attempts_in_range(value: object) -> bool:
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and 1 <= value <= MAX_ATTEMPTS_LIMIT
    )
