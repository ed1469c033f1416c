"""Waiting for work: LISTEN/NOTIFY on PostgreSQL, plain polling elsewhere.

A Waiter sleeps until one of three things happens: a publisher's NOTIFY
arrives, the poll interval passes, or interrupt() is called (from a signal
handler). A burst of notifications wakes the worker once: everything queued on
the listening connection is consumed before it claims again.
"""

import logging
import os
import select
import time
from typing import Any

import psycopg
from django.db import connections

logger = logging.getLogger(__name__)

#: Longest pause between attempts to re-open a lost listening connection.
RECONNECT_CAP_SECONDS = 5.0


class Waiter:
    """Sleep until notified, interrupted or timed out."""

    def __init__(
        self, *, using: str, channel: str, listen: bool, name: str = "outbox"
    ) -> None:
        self.using = using
        self.channel = channel
        self.name = name
        self.listen = listen and connections[using].vendor == "postgresql"
        self._listener: psycopg.Connection[Any] | None = None
        self._reconnect_delay = 0.0
        self._next_connect = 0.0
        self._connected_since_last_wait = False
        # A pipe a signal handler may write to: select() wakes at once.
        self._interrupt_read, self._interrupt_write = os.pipe()
        os.set_blocking(self._interrupt_read, False)
        os.set_blocking(self._interrupt_write, False)

    def interrupt(self) -> None:
        """Wake a wait in progress, or make the next one return at once.

        Safe to call from a signal handler: it only writes one byte.
        """
        try:
            os.write(self._interrupt_write, b"!")
        except BlockingIOError:
            pass  # the pipe is full: a wake-up is already pending

    def start(self) -> None:
        """Start listening, before the worker's first claim.

        Listening only after a claim found nothing would miss a commit made
        in between until the next poll.
        """
        self._listening_connection()
        self._connected_since_last_wait = False

    def wait(self, timeout: float) -> bool:
        """Wait up to timeout seconds; return True if woken before it."""
        sources = [self._interrupt_read]
        listener = self._listening_connection()
        if self._connected_since_last_wait:
            # Re-connected: whatever was committed while nobody listened sent
            # its notification to no one, so look for work now.
            self._connected_since_last_wait = False
            return True
        if listener is not None:
            sources.append(listener.fileno())
        readable, _, _ = select.select(sources, [], [], timeout)
        if not readable:
            return False
        self._drain_interrupts()
        if listener is not None and listener.fileno() in readable:
            self._drain_notifications(listener)
        return True

    def close(self) -> None:
        """Close the listening connection and the interrupt pipe."""
        self._close_listener()
        for descriptor in (self._interrupt_read, self._interrupt_write):
            try:
                os.close(descriptor)
            except OSError:
                pass

    def _listening_connection(self) -> "psycopg.Connection[Any] | None":
        if not self.listen:
            return None
        if self._listener is not None and not self._listener.closed:
            return self._listener
        if time.monotonic() < self._next_connect:
            return None  # poll until the next attempt to reconnect
        try:
            self._listener = self._connect()
            self._connected_since_last_wait = True
        except psycopg.Error as error:
            self._reconnect_delay = min(
                max(self._reconnect_delay * 2, 0.1), RECONNECT_CAP_SECONDS
            )
            self._next_connect = time.monotonic() + self._reconnect_delay
            logger.warning(
                "outbox could not listen for notifications, polling meanwhile: %s",
                type(error).__name__,
                extra={"retry_in_s": self._reconnect_delay},
            )
            return None
        self._reconnect_delay = 0.0
        logger.info("outbox listening on channel %s", self.channel)
        return self._listener

    def _connect(self) -> "psycopg.Connection[Any]":
        # A connection of its own, in autocommit: LISTEN only takes effect
        # outside a transaction, and Django's connection comes and goes.
        params = connections[self.using].get_connection_params()
        params.pop("cursor_factory", None)
        params.pop("context", None)
        params.pop("prepare_threshold", None)
        params["application_name"] = f"{self.name} listener"[:63]
        listener = psycopg.connect(**params, autocommit=True)
        listener.execute(
            psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(self.channel))
        )
        return listener

    def _drain_notifications(self, listener: "psycopg.Connection[Any]") -> None:
        try:
            for _ in listener.notifies(timeout=0):
                pass
        except psycopg.Error as error:
            logger.warning(
                "outbox lost its listening connection: %s",
                type(error).__name__,
            )
            self._close_listener()

    def _drain_interrupts(self) -> None:
        try:
            while os.read(self._interrupt_read, 1024):
                pass
        except BlockingIOError:
            pass

    def _close_listener(self) -> None:
        if self._listener is not None:
            try:
                self._listener.close()
            except psycopg.Error:
                pass
            self._listener = None
