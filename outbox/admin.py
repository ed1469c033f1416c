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
from typing import Any, cast

from django.contrib import admin, messages
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.admin.options import IncorrectLookupParameters
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.functional import cached_property
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.timesince import timesince
from django.views.decorators.http import require_http_methods

from outbox import monitoring, registry
from outbox.models import OutboxEvent, OutboxWorker, Status
from outbox.operations import OperationResult, discard_events, retry_events

#: The field of the retry-all confirmation that carries the count shown.
CONFIRMED_COUNT = "confirmed_count"

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
        ("created_at", admin.DateFieldListFilter),
        HasErrorFilter,
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
                    "queue_name",
                    "key",
                    "idempotency_key",
                    "status_label",
                    "waiting",
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
        self._report(request, "Retried", retry_events(queryset, actor=_actor(request)))

    @admin.action(permissions=["discard"], description="Discard (never run)")
    def discard(self, request: HttpRequest, queryset: QuerySet) -> None:
        """End the selected pending and failed events for good."""
        result = discard_events(queryset, actor=_actor(request))
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
        retry_failed = path(
            "retry-failed/",
            self.admin_site.admin_view(self.retry_failed_view),
            name="outbox_outboxevent_retry_failed",
        )
        return [retry_failed, *super().get_urls()]

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        context = {
            "summary": monitoring.count_by_status(),
            "count_cap": monitoring.COUNT_CAP,
            "can_retry": self.has_retry_permission(request),
            **(extra_context or {}),
        }
        return super().changelist_view(request, extra_context=context)

    @staticmethod
    def _changelist_url(query_string: str) -> str:
        return reverse("admin:outbox_outboxevent_changelist") + query_string

    def retry_failed_view(self, request: HttpRequest) -> HttpResponse:
        """Retry every failed event the changelist's filters and search match.

        A GET shows how many that is and asks; only the POST of that page,
        carrying the count the operator saw, retries them.
        """
        return require_http_methods(["GET", "POST"])(self._retry_failed)(request)

    def _retry_failed(self, request: HttpRequest) -> HttpResponse:
        # Both: the view shows what the filter matches, and the retry acts on it.
        if not (
            self.has_view_permission(request) and self.has_retry_permission(request)
        ):
            raise PermissionDenied
        query = request.GET.urlencode()
        back = self._changelist_url("?" + query if query else "")
        try:
            changelist = self.get_changelist_instance(request)
        except IncorrectLookupParameters:
            self.message_user(request, "Unknown filter.", messages.ERROR)
            return HttpResponseRedirect(back)
        failed = changelist.get_queryset(request).filter(status=Status.FAILED)
        # Discarded events are failed for good: retry_events skips them, so
        # the count to confirm leaves them out.
        retriable = failed.filter(discarded_at__isnull=True)
        count = retriable.count()
        if request.method == "POST" and request.POST.get(CONFIRMED_COUNT) == str(count):
            result = retry_events(retriable, actor=_actor(request))
            self._report(request, "Retried", result)
            return HttpResponseRedirect(back)
        # A count that changed since the page was shown (events failed or
        # were retried meanwhile) is asked again: the operator confirms the
        # number that will be retried, not an older one.
        changed = request.method == "POST" and CONFIRMED_COUNT in request.POST
        return self._confirm_retry_failed(
            request,
            count=count,
            discarded=failed.count() - count,
            changed=changed,
            query=query,
            back=back,
        )

    def _confirm_retry_failed(
        self,
        request: HttpRequest,
        *,
        count: int,
        discarded: int,
        changed: bool,
        query: str,
        back: str,
    ) -> TemplateResponse:
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Retry all failed events matching this filter?",
            "count": count,
            "events": _events(count),
            "discarded": discarded,
            "count_changed": changed,
            "confirmed_count_field": CONFIRMED_COUNT,
            "action": reverse("admin:outbox_outboxevent_retry_failed")
            + ("?" + query if query else ""),
            "back": back,
        }
        return TemplateResponse(
            request, "admin/outbox/outboxevent/retry_failed_confirmation.html", context
        )

    def _report(self, request: HttpRequest, verb: str, result: OperationResult) -> None:
        """Record the changed events in the admin log and tell the operator."""
        changed = OutboxEvent.objects.filter(pk__in=result.changed)
        if result.changed:
            LogEntry.objects.log_actions(
                user_id=cast(int, request.user.pk),  # the admin requires a login
                queryset=changed,
                action_flag=CHANGE,
                change_message=f"{verb} (operator action).",
            )
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


def _actor(request: HttpRequest) -> str:
    return request.user.get_username()


def _events(count: int) -> str:
    return f"{count} event" if count == 1 else f"{count} events"
