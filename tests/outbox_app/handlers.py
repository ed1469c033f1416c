"""Handlers found by the outbox's autodiscovery (and used by worker tests)."""

from outbox import handler
from outbox.models import OutboxEvent
from tests.outbox_app.models import SideEffect


@handler("outbox_testapp.discovered")
def record_discovery(event: OutboxEvent) -> None:
    SideEffect.objects.create(event_uuid=event.uuid, note="discovered")
