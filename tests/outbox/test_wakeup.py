"""Waking workers: released events tell the others, and a burst wakes once."""

import pytest
from django.db import connection

from outbox import publish
from outbox.models import OutboxEvent
from outbox.wakeup import Waiter
from outbox.worker import Worker
from tests.outbox.listening import listen, notifications

pytestmark = pytest.mark.django_db(transaction=True)


def test_release__of_unstarted_events_at_a_stop_wakes_the_other_workers(
    register_handler,
):
    worker = Worker()
    register_handler("stopper", lambda event: worker.stop_requested.set())
    for _ in range(3):
        publish("stopper", {})
    listener = listen()
    try:
        notifications(listener)  # the publishes' own
        assert worker.run_once().released == 2
        assert notifications(listener) == 1
    finally:
        listener.close()


def test_waiter__a_burst_of_notifications_wakes_it_once():
    waiter = Waiter(
        using="default", channel=OutboxEvent._meta.db_table, listen=True, name="test"
    )
    try:
        waiter.start()
        # Twenty distinct notifications, sent together at one commit.
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(pg_notify(%s, n::text)) FROM generate_series(1, 20) n",
                [OutboxEvent._meta.db_table],
            )

        assert waiter.wait(5) is True
        assert waiter.wait(0.2) is False  # all twenty were consumed at once
    finally:
        waiter.close()
