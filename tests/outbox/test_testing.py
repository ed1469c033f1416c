import pytest

from outbox import publish
from outbox.models import OutboxEvent, Status
from outbox.testing import drain
from tests.outbox_app.models import SideEffect


@pytest.mark.sqlite
@pytest.mark.django_db
def test_drain__handles_every_ready_event_inside_a_test_transaction() -> None:
    for _ in range(70):
        publish("outbox_testapp.discovered", {})

    result = drain(batch_size=32)

    assert (result.claimed, result.completed) == (70, 70)
    assert SideEffect.objects.count() == 70
    assert not OutboxEvent.objects.exclude(status=Status.COMPLETED).exists()


@pytest.mark.sqlite
@pytest.mark.django_db
def test_drain__stops_at_max_events_and_leaves_the_rest_untouched() -> None:
    events = [publish("outbox_testapp.discovered", {}) for _ in range(5)]

    result = drain(max_events=2, batch_size=10)

    assert (result.claimed, result.completed, result.released) == (2, 2, 0)
    untouched = (Status.PENDING, 0, "", None)
    assert [
        (event.status, event.attempts, event.locked_by, event.locked_until)
        for event in OutboxEvent.objects.filter(pk__in=[e.pk for e in events[2:]])
    ] == [untouched] * 3


@pytest.mark.sqlite
def test_outbox_drain_fixture__drains(outbox_drain) -> None:
    publish("outbox_testapp.discovered", {})

    assert outbox_drain().completed == 1


@pytest.mark.sqlite
@pytest.mark.django_db
def test_drain__reports_a_failing_handler_as_retried(register_handler) -> None:
    register_handler("broken", lambda event: 1 / 0)
    publish("broken", {})

    result = drain()

    assert (result.claimed, result.retried) == (1, 1)
