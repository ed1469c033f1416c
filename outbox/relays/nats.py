"""NatsRelay: publish events to NATS JetStream, completed once a stream has them.

OPTIONS:
- servers: "nats://host:4222", or a list of such URLs;
- subject: a template naming {event_type} (and {key}), e.g. "events.{event_type}";
- ack_timeout: seconds to wait for the stream's PubAck (default 5);
- connect_timeout: seconds to connect (default 2).

Each message carries the Outbox-* headers and Nats-Msg-Id, the event's
UUID: JetStream keeps one message per id within the stream's duplicate
window (two minutes by default), so a delivery that a crash made the outbox
publish twice is stored once. The connections, one per worker slot, share
one asyncio event loop in a thread of the relay's own (_EventLoop). Needs
nats-py (the "nats" extra).
"""

import asyncio
import contextlib
import logging
import re
import threading
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from outbox.errors import PermanentFailure
from outbox.relays.base import (
    Message,
    Relay,
    RelayRefused,
    is_url,
    shown_url,
    template_problems,
)

try:
    import nats
    import nats.aio.client
    import nats.errors
    import nats.js.errors
except ImportError:  # pragma: no cover - the extra is installed in dev
    nats = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

#: A subject NATS accepts: dot-separated tokens, no spaces, no wildcards.
SUBJECT = re.compile(r"[^\s.*>]+(\.[^\s.*>]+)*")
#: Seconds a slot waits beyond the client's own timeout (connect, PubAck)
#: before it gives up on the event loop itself.
MARGIN = 5.0
#: Seconds to close a connection, or to wait for the loop's thread to end.
CLOSE_TIMEOUT = 5.0

T = TypeVar("T")


class _EventLoop:
    """One asyncio event loop, in a thread of its own, for a relay's connections.

    nats-py is asyncio; the slots are threads. With a loop per slot, driven
    by run_until_complete() once per message, concurrency 16 relayed fewer
    messages per second than concurrency 1 (measured: sixteen loops, each
    started, polled and stopped per message, taking turns at the GIL). Here
    every slot's connection, still one per slot, lives on this one loop; a
    slot hands it its publish and waits for the PubAck on a future, the GIL
    released. The thread runs while any connection is open: the last close
    ends it.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._users = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def acquire(self) -> "_EventLoop":
        """Count one more connection on the loop; start its thread if need be."""
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=_serve, args=(self._loop,), name=self._name, daemon=True
                )
                self._thread.start()
            self._users += 1
        return self

    def release(self) -> None:
        """Count one connection less; stop the thread after the last one.

        The thread is waited for outside the lock, and not for ever: a slot
        that opens a connection meanwhile starts a loop of its own.
        """
        with self._lock:
            self._users -= 1
            if self._users or self._loop is None or self._thread is None:
                return
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        loop.call_soon_threadsafe(loop.stop)
        thread.join(CLOSE_TIMEOUT)

    def run(
        self,
        coroutine: Coroutine[Any, Any, T],
        *,
        timeout: float,
        cancel_late: bool = True,
    ) -> T:
        """Run the coroutine on the loop; wait for its result in this thread.

        Past the timeout (and MARGIN), raise TimeoutError and, unless told
        not to, give the coroutine up: cancelled if it runs, never started
        if the loop has not reached it yet. (Cancelling alone would not stop
        a publish the loop starts late: its first step sends the message.)
        """
        assert self._loop is not None  # noqa: S101 - between acquire() and release()
        given_up = threading.Event()

        async def unless_given_up() -> T:
            if given_up.is_set():
                coroutine.close()
                raise asyncio.CancelledError
            return await coroutine

        future = asyncio.run_coroutine_threadsafe(unless_given_up(), self._loop)
        try:
            return future.result(timeout + MARGIN)
        except TimeoutError:
            if cancel_late:
                given_up.set()
                future.cancel()
            raise


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
        # Stopped after the last connection closed: end what is left of it.
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


@dataclass
class _Connection:
    loop: _EventLoop
    client: Any
    stream: Any


def _connection_errors() -> tuple[type[BaseException], ...]:
    if nats is None:  # pragma: no cover
        return (OSError,)
    return (
        OSError,
        asyncio.TimeoutError,
        nats.errors.ConnectionClosedError,
        nats.errors.NoServersError,
        nats.errors.StaleConnectionError,
        nats.errors.TimeoutError,
        nats.errors.UnexpectedEOF,
    )


class NatsRelay(Relay):
    connection_errors: ClassVar[tuple[type[BaseException], ...]] = _connection_errors()

    def __init__(self, alias: str, options: Mapping[str, Any]) -> None:
        super().__init__(alias, options)
        self._loop = _EventLoop(name=f"outbox-relay-{alias}")

    @classmethod
    def problems(cls, options: Mapping[str, Any]) -> list[str]:
        found = []
        if nats is None:
            found.append("needs nats-py: install the 'nats' extra.")
        servers = options.get("servers")
        urls = [servers] if isinstance(servers, str) else servers
        if not isinstance(urls, list) or not urls:
            found.append(
                "OPTIONS['servers'] must be a nats:// URL or a list of them, got "
                f"{type(servers).__name__}."
            )
        else:
            for url in urls:
                if not is_url(url, ("nats", "tls")):
                    found.append(
                        f"OPTIONS['servers'] has {shown_url(url)}, not a nats:// URL."
                    )
        found += template_problems("OPTIONS['subject']", options.get("subject"))
        for name in ("ack_timeout", "connect_timeout"):
            value = options.get(name, 1)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or value <= 0
            ):
                found.append(f"OPTIONS[{name!r}] must be a positive number of seconds.")
        return found

    def open(self) -> _Connection:
        assert nats is not None  # noqa: S101 - the checks refuse the relay without it
        servers = self.options["servers"]
        if isinstance(servers, str):
            servers = [servers]
        connect_timeout = self.options.get("connect_timeout", 2)
        loop = self._loop.acquire()
        try:
            client = loop.run(
                _connect(
                    servers=servers,
                    name=f"outbox-relay-{self.alias}",
                    connect_timeout=connect_timeout,
                    # A lost connection is replaced by the relay, not
                    # reconnected behind a publish waiting for its ack.
                    allow_reconnect=False,
                    # Each server tried once (0 would mean: for ever).
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0,
                    error_cb=_ignore,
                    disconnected_cb=_ignore_event,
                    closed_cb=_ignore_event,
                ),
                timeout=connect_timeout * len(servers),
            )
        except BaseException:
            loop.release()
            raise
        return _Connection(loop, client, client.jetstream())

    def send(self, connection: Any, message: Message) -> None:
        subject = message.fill(self.options["subject"])
        if not SUBJECT.fullmatch(subject):
            raise PermanentFailure(
                f"NATS cannot take subject {subject!r}: a subject is dot-separated "
                "tokens without spaces or wildcards"
            )
        headers = {**message.headers, "Nats-Msg-Id": message.event_id}
        size = len(message.body) + sum(len(k) + len(v) + 4 for k, v in headers.items())
        if size > connection.client.max_payload:
            raise PermanentFailure(
                f"the message for subject {subject!r} is {size} bytes; the NATS "
                f"server takes at most {connection.client.max_payload}"
            )
        ack_timeout = self.options.get("ack_timeout", 5)
        try:
            ack = connection.loop.run(
                connection.stream.publish(
                    subject,
                    message.body,
                    timeout=ack_timeout,
                    headers=headers,
                ),
                timeout=ack_timeout,
            )
        except nats.js.errors.NoStreamResponseError:
            raise RelayRefused(
                f"no JetStream stream takes subject {subject!r}"
            ) from None
        except nats.js.errors.APIError as error:
            raise RelayRefused(
                f"JetStream refused subject {subject!r}: {error.description or error}"
            ) from None
        if ack.duplicate and message.attempt == 1:
            # A repeat is expected after a crash (a later attempt); on a first
            # attempt, something else published this id into the stream: two
            # relays writing to one stream, most likely. The stream has the
            # event; a consumer of only this subject may not see it.
            logger.warning(
                "outbox relay %s: JetStream stored event %s already (a duplicate "
                "Nats-Msg-Id on a first attempt): does another relay publish into "
                "stream %s?",
                self.alias,
                message.event_id,
                ack.stream,
                extra={"relay": self.alias, "event_uuid": message.event_id},
            )

    def close(self, connection: Any) -> None:
        try:
            if not connection.client.is_closed:
                # A close that a stalled loop delays still runs once it can:
                # cancelled, it would leave the socket open.
                connection.loop.run(
                    connection.client.close(), timeout=0, cancel_late=False
                )
        finally:
            connection.loop.release()


async def _connect(**options: Any) -> Any:
    """nats.connect(), closing what a failed attempt leaves open.

    Without reconnects, nats-py raises from a failed connect with its
    socket still open; on the relay's loop, which outlives any one slot's
    connection, those sockets would pile up while a broker is unreachable.
    """
    assert nats is not None  # noqa: S101 - the checks refuse the relay without it
    client = nats.aio.client.Client()
    try:
        await client.connect(**options)
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), CLOSE_TIMEOUT)
        raise
    return client


async def _ignore(error: Exception) -> None:
    """The client's own error reports: the relay sees them as send() errors."""


async def _ignore_event() -> None:
    """Disconnects and closes: the relay replaces the connection itself."""
