"""The leases of the events a worker holds: the one place that extends them.

A claim leases its events for the lease period. While a worker holds an
event (claimed, running, or finished with its outcome not yet written), the
heartbeat calls extend() every few seconds so a slow handler is not taken
for a dead worker's. An event leaves the set as soon as its outcome is
written or lost: a lease nobody will write an outcome for must lapse, so
the rescue hands the event on.

Slots read the set from their threads and the heartbeat from its own; a
lock keeps the three consistent.
"""

import threading
import time
from collections.abc import Iterable
from datetime import timedelta

from django.db import transaction

from outbox import statements
from outbox.models import OutboxEvent

#: Share of the lease after which a slot re-checks it before starting an
#: event, rather than trust that the heartbeat kept it.
TRUST_SHARE = 0.5


class Leases:
    def __init__(self, *, using: str, duration: timedelta) -> None:
        self.using = using
        self.duration = duration
        self._lock = threading.Lock()
        #: event id -> (lease token, monotonic time the lease was last confirmed)
        self._held: dict[int, tuple[int, float]] = {}

    def __len__(self) -> int:
        return len(self._held)

    def hold(
        self, events: Iterable[OutboxEvent], *, claimed_at: float | None = None
    ) -> None:
        """Start keeping these freshly claimed events' leases.

        claimed_at: the monotonic time from before the claim, when the lease
        was confirmed at the latest; what ran between the claim and this call
        (on_commit callbacks of the claim's transaction) does not count as
        confirmation.
        """
        confirmed = time.monotonic() if claimed_at is None else claimed_at
        with self._lock:
            for event in events:
                self._held[event.pk] = (event.lease_token or 0, confirmed)

    def drop(self, events: Iterable[OutboxEvent]) -> None:
        """Stop keeping these events' leases: written, released or lost.

        Only under the claim each run came from: a stale run of an event this
        worker claimed again must not drop the new claim's lease.
        """
        with self._lock:
            for event in events:
                held = self._held.get(event.pk)
                if held is not None and held[0] == (event.lease_token or 0):
                    del self._held[event.pk]

    def still_held(self, event: OutboxEvent, *, using: str) -> bool:
        """Whether the event's lease is surely still this worker's.

        Free while the lease was confirmed within TRUST_SHARE of its period;
        past that (a stalled process, a heartbeat that kept failing), one
        fenced UPDATE on the caller's connection confirms and extends it, so
        a worker never starts an event someone else may have taken.
        """
        with self._lock:
            token, confirmed = self._held.get(event.pk, (0, 0.0))
        if token != (event.lease_token or 0):
            return False  # a stale copy: this worker claimed the event again
        trusted_for = self.duration.total_seconds() * TRUST_SHARE
        if time.monotonic() - confirmed < trusted_for:
            return True
        started = time.monotonic()
        extended = statements.extend(
            [(event.pk, token)], using=using, lease=self.duration
        )
        if not extended:
            return False
        self._confirm(extended, started)
        return True

    def extend(self) -> int:
        """Push back the lease of every event held; return how many moved.

        SKIP LOCKED: an event whose handler is writing its completion right
        now is locked by that transaction and about to leave the set; the
        heartbeat does not wait for it.
        """
        with self._lock:
            held = [(pk, token) for pk, (token, _) in self._held.items()]
        if not held:
            return 0
        started = time.monotonic()
        ids = [pk for pk, _ in held]
        with transaction.atomic(using=self.using):
            free = set(
                OutboxEvent.objects.using(self.using)
                .filter(pk__in=ids)
                .select_for_update(skip_locked=True)
                .values_list("pk", flat=True)
            )
            extended = statements.extend(
                [pair for pair in held if pair[0] in free],
                using=self.using,
                lease=self.duration,
            )
        self._confirm(extended, started)
        return len(extended)

    def _confirm(self, ids: Iterable[int], at: float) -> None:
        with self._lock:
            for pk in ids:
                if pk in self._held:
                    self._held[pk] = (self._held[pk][0], at)
