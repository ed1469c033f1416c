"""A LISTEN connection of its own, to see what workers would be told."""

import psycopg
from django.db import connection


def listen(channel: str = "outbox_outboxevent") -> psycopg.Connection:
    settings = connection.settings_dict
    listener = psycopg.connect(
        host=settings["HOST"] or "127.0.0.1",
        port=settings["PORT"] or 5432,
        user=settings["USER"],
        dbname=settings["NAME"],
        autocommit=True,
    )
    listener.execute(f"LISTEN {channel}")
    return listener


def notifications(listener: psycopg.Connection) -> int:
    return sum(1 for _ in listener.notifies(timeout=0.2))
