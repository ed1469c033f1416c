"""The operator's console: inspect, retry and discard events; see the workers.

Everything here stays fast on a table of millions of completed events: no
full COUNT(*) (show_full_result_count is off and the paginator counts at most
COUNT_CAP rows), filters without a query for their choices, exact-match search
on indexed columns, and a status summary from outbox.monitoring. Events are
never edited, added or deleted here: retry and discard are the only writes,
each permission-checked, recorded in the admin log and done by
outbox.operations.
"""

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlencode

from django.contrib import admin, messages
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.admin.options import IncorrectLookupParameters
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import Q, QuerySet
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseNotAllowed,
    HttpResponseRedirect,
)
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.functional import cached_property
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.text import Truncator
from django.utils.timesince import timesince

from outbox import activity, charts, monitoring, registry
from outbox.models import OutboxEvent, OutboxWorker, Status
from outbox.operations import OperationResult, discard_events, retry_events

#: The field of the retry-all confirmation that carries the count shown.
CONFIRMED_COUNT = "confirmed_count"
#: The subscriber filter's value for the event type's unnamed handler.
UNNAMED = "-"


@dataclass(frozen=True)
class FailedAction:
    """What an operator may do to every failed event a filter matches."""

    #: Also the permission it needs: has_<name>_permission().
    name: str
    verb: str
    explanation: str
    operate: Callable[..., OperationResult]


RETRY_FAILED = FailedAction(
    name="retry",
    verb="Retried",
    explanation="Each becomes pending now with a fresh attempt budget, behind any "
    "earlier unfinished event of its key; its history is kept.",
    operate=retry_events,
)
DISCARD_FAILED = FailedAction(
    name="discard",
    verb="Discarded",
    explanation="Each stays failed for good: no worker and no retry runs it "
    "again. Its history is kept, with who discarded it.",
    operate=discard_events,
)

STATUS_COLOURS = {
    Status.PENDING: "#2f6fb0",
    Status.PROCESSING: "#b07a00",
    Status.COMPLETED: "#2e7d32",
    Status.FAILED: "#c62828",
}


class CappedCountPaginator(Paginator):
    """Count at most COUNT_CAP + 1 rows: page links stop there, queries do not.

    A COUNT(*) over a million rows on every page view is what makes admin
    changelists slow; the operator narrows the filter instead.
    """

    @cached_property
    def count(self) -> int:
        events = cast(QuerySet[OutboxEvent], self.object_list)
        return events[: monitoring.COUNT_CAP + 1].count()


class EventTypeFilter(admin.SimpleListFilter):
    """Filter by event type; the choices are the registered handlers' types.

    The choices come from the registry, not from SELECT DISTINCT over the
    table, which would read every row on every page view.
    """

    title = "event type"
    parameter_name = "event_type"

    def lookups(
        self, request: HttpRequest, model_admin: admin.ModelAdmin
    ) -> list[tuple[str, str]]:
        types = registry.registered_event_types()
        chosen = self.value()
        if chosen and chosen not in types:
            types.append(chosen)
        return [(event_type, event_type) for event_type in types]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        chosen = self.value()
        return queryset.filter(event_type=chosen) if chosen else queryset


class SubscriberFilter(admin.SimpleListFilter):
    """Filter by subscriber: the registered named handlers, or the unnamed one."""

    title = "subscriber"
    parameter_name = "subscriber"

    def lookups(
        self, request: HttpRequest, model_admin: admin.ModelAdmin
    ) -> list[tuple[str, str]]:
        names = registry.registered_subscribers()
        chosen = self.value()
        if chosen and chosen != UNNAMED and chosen not in names:
            names.append(chosen)
        return [(UNNAMED, "(unnamed handler)"), *((name, name) for name in names)]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        chosen = self.value()
        if not chosen:
            return queryset
        return queryset.filter(subscriber="" if chosen == UNNAMED else chosen)


class KindFilter(admin.SimpleListFilter):
    """Events published with publish(), or django.tasks tasks (outbox.tasks)."""

    title = "kind"
    parameter_name = "kind"

    def lookups(
        self, request: HttpRequest, model_admin: admin.ModelAdmin
    ) -> list[tuple[str, str]]:
        return [("events", "Events"), ("tasks", "Tasks")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        tasks = Q(event_type__startswith=registry.TASK_EVENT_PREFIX)
        if self.value() == "tasks":
            return queryset.filter(tasks)
        if self.value() == "events":
            return queryset.exclude(tasks)
        return queryset


class ErrorCauseFilter(admin.SimpleListFilter):
    """Filter by error cause (outbox.causes): the dead letters' groups link here.

    Like the dead letters, it leaves discarded events out: a group's count
    and its list agree. No choices of its own (a SELECT DISTINCT would read
    every failed row); the one chosen is shown, so it can be cleared.
    """

    title = "error cause"
    parameter_name = "error_cause"

    def lookups(
        self, request: HttpRequest, model_admin: admin.ModelAdmin
    ) -> list[tuple[str, str]]:
        chosen = self.value()
        return [(chosen, Truncator(chosen).chars(60))] if chosen else []

    def has_output(self) -> bool:
        return self.value() is not None

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        chosen = self.value()
        if chosen is None:
            return queryset
        return queryset.filter(error_cause=chosen, discarded_at__isnull=True)


class HasErrorFilter(admin.SimpleListFilter):
    """Filter events that failed at least one attempt (partial index)."""

    title = "has error"
    parameter_name = "has_error"

    def lookups(
        self, request: HttpRequest, model_admin: admin.ModelAdmin
    ) -> list[tuple[str, str]]:
        return [("yes", "Yes"), ("no", "No")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() == "yes":
            return queryset.exclude(last_error="")
        if self.value() == "no":
            return queryset.filter(last_error="")
        return queryset


@admin.register(OutboxEvent)
class OutboxEventAdmin(admin.ModelAdmin):
    list_display = (
        "uuid",
        "event_type",
        "subscriber",
        "queue_name",
        "key",
        "status_label",
        "attempts_label",
        "available_at",
        "age",
        "locked_by",
        "error_summary",
    )
    list_display_links = ("uuid",)
    list_filter = (
        "status",
        KindFilter,
        EventTypeFilter,
        SubscriberFilter,
        ("created_at", admin.DateFieldListFilter),
        HasErrorFilter,
        ErrorCauseFilter,
    )
    search_fields = ("uuid", "event_type", "key", "idempotency_key")
    search_help_text = (
        "An exact UUID, event type, key or idempotency key (exact matches keep "
        "the search on the indexes)."
    )
    show_full_result_count = False
    paginator = CappedCountPaginator
    list_per_page = 50
    actions = ("retry_now", "discard")
    change_list_template = "admin/outbox/outboxevent/change_list.html"
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "uuid",
                    "event_type",
                    "subscriber",
                    "queue_name",
                    "key",
                    "idempotency_key",
                    "status_label",
                    "waiting",
                    "trace_label",
                )
            },
        ),
        (
            "Delivery",
            {
                "fields": (
                    "attempts_label",
                    "available_at",
                    "created_at",
                    "started_at",
                    "last_attempted_at",
                    "completed_at",
                    "failed_at",
                    "lease",
                )
            },
        ),
        # The event's other deliveries: one row per subscriber (fan-out).
        ("Deliveries of this event", {"fields": ("deliveries_table",)}),
        ("Payload", {"fields": ("payload_pretty",)}),
        # What a django.tasks task returned (outbox.tasks); events have none.
        ("Result", {"fields": ("result_pretty",)}),
        ("Errors", {"fields": ("last_error", "history_table")}),
        ("Discarded", {"fields": ("discarded_at", "discarded_by")}),
    )
    readonly_fields = (
        "status_label",
        "attempts_label",
        "lease",
        "payload_pretty",
        "result_pretty",
        "history_table",
        "trace_label",
        "deliveries_table",
    )

    # Events are written by publish() and the workers; here they are only
    # read, retried and discarded, so nothing an operator clicks loses data.
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(
        self, request: HttpRequest, obj: OutboxEvent | None = None
    ) -> bool:
        return False

    def has_delete_permission(
        self, request: HttpRequest, obj: OutboxEvent | None = None
    ) -> bool:
        return False

    def has_retry_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(f"{self.opts.app_label}.retry_outboxevent")

    def has_discard_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(f"{self.opts.app_label}.discard_outboxevent")

    @admin.action(permissions=["retry"], description="Retry now")
    def retry_now(self, request: HttpRequest, queryset: QuerySet) -> None:
        """Make the selected failed events pending now, with fresh attempts."""
        result = retry_events(
            queryset, actor=_actor(request), audit=self._audit(request, "Retried")
        )
        self._report(request, "Retried", result)

    @admin.action(permissions=["discard"], description="Discard (never run)")
    def discard(self, request: HttpRequest, queryset: QuerySet) -> None:
        """End the selected pending and failed events for good."""
        result = discard_events(
            queryset, actor=_actor(request), audit=self._audit(request, "Discarded")
        )
        self._report(request, "Discarded", result)

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet, search_term: str
    ) -> tuple[QuerySet, bool]:
        """Match exactly: a UUID on its own, or a type, key or idempotency key.

        The default (icontains on every field) reads the whole table.
        """
        term = search_term.strip()
        if not term:
            return queryset, False
        try:
            return queryset.filter(uuid=uuid.UUID(term)), False
        except ValueError:
            pass
        return (
            queryset.filter(Q(idempotency_key=term) | Q(key=term) | Q(event_type=term)),
            False,
        )

    def get_urls(self) -> list[URLPattern]:
        def view(name: str, function: Callable[[HttpRequest], HttpResponse]) -> Any:
            return path(
                f"{name.replace('_', '-')}/",
                self.admin_site.admin_view(function),
                name=f"outbox_outboxevent_{name}",
            )

        return [
            view("retry_failed", self.retry_failed_view),
            view("discard_failed", self.discard_failed_view),
            view("dead_letters", self.dead_letters_view),
            *super().get_urls(),
        ]

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        minutes = activity.last_hour()
        context = {
            "summary": monitoring.count_by_status(),
            "count_cap": monitoring.COUNT_CAP,
            "can_retry": self.has_retry_permission(request),
            "activity_chart": charts.activity_chart(minutes),
            "last_hour": {
                "completed": sum(minute.completed for minute in minutes),
                "failed": sum(minute.failed for minute in minutes),
            },
            **(extra_context or {}),
        }
        return super().changelist_view(request, extra_context=context)

    @staticmethod
    def _changelist_url(query_string: str) -> str:
        return reverse("admin:outbox_outboxevent_changelist") + query_string

    def dead_letters_view(self, request: HttpRequest) -> HttpResponse:
        """The failed events grouped by event type and cause, and the keys
        held back behind a retrying head."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        groups = monitoring.failure_groups(limit=monitoring.GROUP_LIMIT + 1)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Dead letters: failed events by cause",
            "groups": [
                (group, _group_query(group))
                for group in groups[: monitoring.GROUP_LIMIT]
            ],
            "more_groups": len(groups) > monitoring.GROUP_LIMIT,
            "group_limit": monitoring.GROUP_LIMIT,
            "held_count_cap": monitoring.HELD_COUNT_CAP,
            "held_keys": monitoring.held_keys(),
            "can_retry": self.has_retry_permission(request),
            "can_discard": self.has_discard_permission(request),
            "changelist": self._changelist_url(""),
        }
        return TemplateResponse(
            request, "admin/outbox/outboxevent/dead_letters.html", context
        )

    def retry_failed_view(self, request: HttpRequest) -> HttpResponse:
        """Retry every failed event the changelist's filters and search match.

        A GET shows how many that is and asks; only the POST of that page,
        carrying the count the operator saw, retries them.
        """
        return self._on_failed(request, RETRY_FAILED)

    def discard_failed_view(self, request: HttpRequest) -> HttpResponse:
        """Discard every failed event the filters match, confirmed as a retry is."""
        return self._on_failed(request, DISCARD_FAILED)

    def _on_failed(self, request: HttpRequest, action: "FailedAction") -> HttpResponse:
        if request.method not in ("GET", "POST"):
            return HttpResponseNotAllowed(["GET", "POST"])
        # Both: the view shows what the filter matches, and the action acts on it.
        permitted = getattr(self, f"has_{action.name}_permission")
        if not (self.has_view_permission(request) and permitted(request)):
            raise PermissionDenied
        query = request.GET.urlencode()
        back = self._changelist_url("?" + query if query else "")
        try:
            changelist = self.get_changelist_instance(request)
        except IncorrectLookupParameters:
            self.message_user(request, "Unknown filter.", messages.ERROR)
            return HttpResponseRedirect(back)
        failed = changelist.get_queryset(request).filter(status=Status.FAILED)
        # Discarded events are failed for good: neither action touches them,
        # so the count to confirm leaves them out.
        retriable = failed.filter(discarded_at__isnull=True)
        count = retriable.count()
        if request.method == "POST" and request.POST.get(CONFIRMED_COUNT) == str(count):
            result = action.operate(
                retriable,
                actor=_actor(request),
                audit=self._audit(request, action.verb),
            )
            self._report(request, action.verb, result)
            return HttpResponseRedirect(back)
        # A count that changed since the page was shown (events failed or
        # were retried meanwhile) is asked again: the operator confirms the
        # number that will be acted on, not an older one.
        changed = request.method == "POST" and CONFIRMED_COUNT in request.POST
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": f"{action.name.capitalize()} all failed events matching "
            "this filter?",
            "action_name": action.name,
            "explanation": action.explanation,
            "count": count,
            "events": _events(count),
            "discarded": failed.count() - count,
            "count_changed": changed,
            "confirmed_count_field": CONFIRMED_COUNT,
            "action": reverse(f"admin:outbox_outboxevent_{action.name}_failed")
            + ("?" + query if query else ""),
            "back": back,
        }
        return TemplateResponse(
            request, "admin/outbox/outboxevent/failed_action_confirmation.html", context
        )

    @staticmethod
    def _audit(request: HttpRequest, verb: str) -> Callable[[list[int]], None]:
        """Record changed events in the admin log, in the transaction changing them."""

        def log(changed: list[int]) -> None:
            LogEntry.objects.log_actions(
                user_id=cast(int, request.user.pk),  # the admin requires a login
                queryset=OutboxEvent.objects.filter(pk__in=changed),
                action_flag=CHANGE,
                change_message=f"{verb} (operator action).",
            )

        return log

    def _report(self, request: HttpRequest, verb: str, result: OperationResult) -> None:
        """Tell the operator what changed and what was skipped, and why."""
        message = f"{verb} {_events(len(result.changed))}."
        if result.skipped:
            message += (
                f" Skipped {_events(result.skipped_count)}: "
                f"{result.describe_skipped()}."
            )
        level = messages.SUCCESS if result.changed else messages.WARNING
        self.message_user(request, message, level)

    @admin.display(description="status", ordering="status")
    def status_label(self, event: OutboxEvent) -> SafeString:
        label = event.get_status_display()
        if event.discarded_at is not None:
            label += " (discarded)"
        return format_html(
            '<strong class="outbox-status outbox-status-{}" style="color: {}">{}'
            "</strong>",
            event.status,
            STATUS_COLOURS.get(Status(event.status), "inherit"),
            label,
        )

    @admin.display(description="attempts")
    def attempts_label(self, event: OutboxEvent) -> str:
        return f"{event.attempts} / {event.max_attempts}"

    @admin.display(description="age", ordering="created_at")
    def age(self, event: OutboxEvent) -> str:
        return timesince(event.created_at)

    @admin.display(description="last error")
    def error_summary(self, event: OutboxEvent) -> str:
        first_line = event.last_error.splitlines()[0] if event.last_error else ""
        return first_line[:120]

    @admin.display(description="lease")
    def lease(self, event: OutboxEvent) -> str:
        if not event.locked_by:
            return "none"
        if event.locked_until is None:
            return f"last held by {event.locked_by}"
        state = "live" if event.locked_until > timezone.now() else "expired"
        until = event.locked_until.isoformat(sep=" ", timespec="seconds")
        return f"held by {event.locked_by} until {until} ({state})"

    @admin.display(description="deliveries")
    def deliveries_table(self, event: OutboxEvent) -> SafeString:
        """Every subscriber's delivery of the event, this one marked."""
        deliveries = (
            OutboxEvent.objects.filter(uuid=event.uuid)
            .only("subscriber", "status", "attempts", "max_attempts", "discarded_at")
            .order_by("subscriber")
        )
        rows = format_html_join(
            "",
            '<tr class="{}"><td><a href="{}">{}</a></td><td>{}</td><td>{} / {}</td>'
            "</tr>",
            (
                (
                    "outbox-delivery-this" if other.pk == event.pk else "",
                    reverse("admin:outbox_outboxevent_change", args=[other.pk]),
                    other.subscriber or "(unnamed handler)",
                    self.status_label(other),
                    other.attempts,
                    other.max_attempts,
                )
                for other in deliveries
            ),
        )
        return format_html(
            '<table class="outbox-deliveries"><thead><tr><th>Subscriber</th>'
            "<th>Status</th><th>Attempts</th></tr></thead><tbody>{}</tbody></table>",
            rows,
        )

    @admin.display(description="trace")
    def trace_label(self, event: OutboxEvent) -> str:
        """The publishing span's W3C traceparent (outbox.tracing), if any."""
        context = event.trace_context
        if isinstance(context, dict) and context.get("traceparent"):
            return str(context["traceparent"])
        return "none (published outside a traced span)"

    @admin.display(description="payload")
    def payload_pretty(self, event: OutboxEvent) -> SafeString:
        text = json.dumps(event.payload, indent=2, sort_keys=True, ensure_ascii=False)
        return format_html('<pre class="outbox-payload">{}</pre>', text)

    @admin.display(description="result")
    def result_pretty(self, event: OutboxEvent) -> SafeString:
        if event.status != Status.COMPLETED:
            return format_html("<p>{}</p>", "None yet: the event has not completed.")
        text = json.dumps(event.result, indent=2, sort_keys=True, ensure_ascii=False)
        return format_html('<pre class="outbox-result">{}</pre>', text)

    @admin.display(description="history")
    def history_table(self, event: OutboxEvent) -> SafeString:
        if not event.history:
            return format_html("<p>{}</p>", "No failed attempts.")
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}{}</td></tr>",
            (
                (
                    entry.get("at", ""),
                    entry.get("attempt", ""),
                    entry.get("worker") or entry.get("operator", ""),
                    entry.get("error") or entry.get("action", ""),
                    entry.get("message", ""),
                    _traceback(entry),
                )
                for entry in event.history
            ),
        )
        return format_html(
            '<table class="outbox-history"><thead><tr><th>When</th><th>Attempt'
            "</th><th>Worker or operator</th><th>Error or action</th>"
            "<th>Message</th></tr></thead><tbody>{}</tbody></table>",
            rows,
        )


@admin.register(OutboxWorker)
class OutboxWorkerAdmin(admin.ModelAdmin):
    """The workers' heartbeat table, read-only."""

    list_display = (
        "worker_id",
        "hostname",
        "pid",
        "started_at",
        "last_seen_at",
        "alive",
    )
    search_fields = ("worker_id", "hostname")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(
        self, request: HttpRequest, obj: OutboxWorker | None = None
    ) -> bool:
        return False

    def has_delete_permission(
        self, request: HttpRequest, obj: OutboxWorker | None = None
    ) -> bool:
        return False

    @admin.display(boolean=True, description="alive")
    def alive(self, worker: OutboxWorker) -> bool:
        return timezone.now() - worker.last_seen_at <= monitoring.stale_after()


def _traceback(entry: dict[str, Any]) -> SafeString:
    if not entry.get("traceback"):
        return format_html("{}", "")
    return format_html(
        '<details class="outbox-traceback"><summary>Traceback</summary>'
        "<pre>{}</pre></details>",
        entry["traceback"],
    )


def _group_query(group: monitoring.FailureGroup) -> str:
    """The changelist's query string for a group's failed events."""
    return "?" + urlencode(
        {
            "status__exact": Status.FAILED,
            "event_type": group.event_type,
            "subscriber": group.subscriber or UNNAMED,
            "error_cause": group.cause,
        }
    )


def _actor(request: HttpRequest) -> str:
    return request.user.get_username()


def _events(count: int) -> str:
    return f"{count} event" if count == 1 else f"{count} events"
