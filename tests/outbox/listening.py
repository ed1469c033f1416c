"""A LISTEN connection of its own, to see what workers would be told."""

import psycopg

from tests.outbox.sessions import connect

MARKER = "end-of-test-marker"


def listen(channel: str = "outbox_outboxevent") -> psycopg.Connection:
    listener = connect()
    listener.execute(f"LISTEN {channel}")
    return listener


def notifications(
    listener: psycopg.Connection, channel: str = "outbox_outboxevent"
) -> int:
    """Count the notifications that arrived since the last call.

    A marker notification, sent now from another session, closes the count:
    PostgreSQL delivers notifications in commit order, so everything that
    committed before it has arrived once the marker has, and no fixed wait
    is needed either way.
    """
    with connect() as sender:
        sender.execute("SELECT pg_notify(%s, %s)", [channel, MARKER])
    count = 0
    for notification in listener.notifies(timeout=10):
        if notification.payload == MARKER:
            return count
        count += 1
    raise AssertionError("the marker notification never arrived")
