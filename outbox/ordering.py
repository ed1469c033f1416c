"""Order per key: the locks and the `waiting` flag that keep it.

Events with the same non-empty key run one at a time, in publish order, for
each subscriber: a key's deliveries to one subscriber are its lane, (key,
subscriber), and lanes of one key do not wait for each other. Two rules
hold this (docs/architecture.md, "Order per key"):

- Whoever adds or re-opens events of a key (publish(), an operator's retry)
  holds the key's advisory lock until its transaction ends, so a key's id
  order is its commit order, and checks for earlier unfinished events of
  the lane under that lock. (One lock per key, whatever the lane.)
- Only the earliest unfinished event of a lane is claimable (waiting=False);
  whoever finishes or removes a lane's head promotes the next one.

Everything that touches `waiting` goes through this module, but for the
check publish()'s INSERT makes itself (outbox.deliveries), which
queue_up() relies on.
"""

from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING

from django.db import connections, transaction
from django.db.models import Min, Q, Subquery

from outbox.errors import UnsupportedIsolationLevel
from outbox.models import UNFINISHED, OutboxEvent, Status

if TYPE_CHECKING:
    from outbox.deliveries import Delivery

#: A key's deliveries to one subscriber: (key, subscriber).
Lane = tuple[str, str]

#: First half of the advisory lock on a key ("ob" in ASCII), so the outbox's
#: locks never collide with an application's own advisory locks.
KEY_LOCK_CLASS = 0x6F62


def lock_keys(keys: Collection[str], using: str) -> None:
    """Hold these keys' locks until the current transaction ends.

    One call takes its locks in a fixed order; two transactions that lock
    several keys in opposite orders can still deadlock, like any two
    transactions locking rows in opposite orders, and PostgreSQL then aborts
    one of them.
    """
    connection = connections[using]
    if connection.vendor != "postgresql" or not keys:
        return  # SQLite's IMMEDIATE transactions already serialise writers.
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT current_setting('transaction_isolation'),"
            " (SELECT count(pg_advisory_xact_lock(%s, lock)) FROM ("
            "  SELECT DISTINCT hashtext(key) AS lock"
            "  FROM unnest(%s::text[]) AS key ORDER BY lock) AS locks)",
            [KEY_LOCK_CLASS, list(keys)],
        )
        isolation = cursor.fetchone()[0]
    if isolation != "read committed":
        # The check for earlier events of the key must see what committed
        # while this transaction waited for the lock; a snapshot taken
        # before that would let two events of one key run at once.
        raise UnsupportedIsolationLevel(
            f"Events with a key need READ COMMITTED isolation, not {isolation}."
        )


def join_queues(rows: Sequence["Delivery"], using: str) -> None:
    """Lock the keys of new rows and set waiting on each (queue_up())."""
    lock_keys({row.key for row in rows if row.key}, using)
    queue_up(rows, using)


def queue_up(rows: Sequence["Delivery"], using: str) -> None:
    """Set waiting on new rows whose keys this transaction has locked.

    Call just before inserting the rows (outbox.deliveries): publishers of a
    key hold its lock, so what is checked under it is every earlier event of
    the key that will ever exist. The first new row of a lane is its head
    unless the lane has an unfinished event; every later one waits. On
    PostgreSQL the INSERT itself checks the table, so this costs no query;
    SQLite, whose writers are serialised, asks here.
    """
    keyed = [row for row in rows if row.key]
    if not keyed:
        return
    busy: set[Lane] = set()
    if connections[using].vendor != "postgresql":
        busy.update(
            OutboxEvent.objects.using(using)
            .filter(key__in={row.key for row in keyed}, status__in=UNFINISHED)
            .values_list("key", "subscriber")
            .distinct()
        )
    for row in keyed:
        lane = lane_of(row)
        row.waiting = lane in busy
        busy.add(lane)


def lane_of(event: "OutboxEvent | Delivery") -> Lane:
    return (event.key, event.subscriber)


def finishes_key(status: str) -> bool:
    """Whether an event that ends in this status lets the next of its key run.

    Completed and failed events are done with; a retried one is still its
    key's head and holds the others back until it finishes.
    """
    return status in (Status.COMPLETED, Status.FAILED)


def advance(lanes: Collection[Lane], using: str) -> set[Lane]:
    """Promote the next event of each finished lane; return the lanes to re-check.

    Call in the transaction that finished the lanes' heads. A publisher of
    the key still inside its transaction may add an event this cannot see
    yet; such a key's lock is busy, so the caller checks its lanes again
    later (recheck()), when that publisher's NOTIFY has woken it.
    """
    busy = busy_lanes(lanes, using)
    promote_heads(lanes, using)
    return busy


def recheck(lanes: Collection[Lane], using: str) -> set[Lane]:
    """Promote the lanes a publisher or an operator held at the last try.

    Unlike a head's own outcome transaction, this one holds no row lock
    that an operator's retry would wait for, so a lane whose key is still
    held is left for the next try rather than promoted under someone's
    feet. Return the lanes still held.
    """
    if not lanes:
        return set()
    with transaction.atomic(using=using):
        busy = busy_lanes(lanes, using)
        promote_heads(set(lanes) - busy, using)
    return busy


def busy_lanes(lanes: Collection[Lane], using: str) -> set[Lane]:
    """Take each lane's key lock if it is free; return the lanes others hold."""
    busy = busy_keys({key for key, _ in lanes}, using)
    return {lane for lane in lanes if lane[0] in busy}


def busy_keys(keys: Collection[str], using: str) -> set[str]:
    """Take each key's lock if it is free; return the keys others hold.

    Never waits, so a worker cannot deadlock with a publisher.
    """
    connection = connections[using]
    if connection.vendor != "postgresql" or not keys:
        return set()  # SQLite: the caller's transaction already excludes them.
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT key FROM unnest(%s::text[]) AS keys(key) "
            "WHERE NOT pg_try_advisory_xact_lock(%s, hashtext(key))",
            [sorted(keys), KEY_LOCK_CLASS],
        )
        return {row[0] for row in cursor.fetchall()}


def promote_heads(lanes: Collection[Lane], using: str) -> int:
    """Make the earliest unfinished event of each lane claimable.

    Promoting a lane's earliest committed unfinished event is always right; it
    cannot see events of publishers still inside their transactions, which
    is why callers that did not lock the keys check busy_lanes() first.
    """
    if not lanes:
        return 0
    heads = [
        Subquery(
            OutboxEvent.objects.using(using)
            .unfinished_of_lane(key, subscriber)
            .order_by("id")
            .values("id")[:1]
        )
        for key, subscriber in sorted(lanes)
    ]
    waiting = OutboxEvent.objects.using(using).filter(waiting=True)
    return waiting.filter(pk__in=heads).update(waiting=False)  # type: ignore[misc]


def hold_back_behind(heads: Mapping[Lane, int], using: str) -> int:
    """Make pending events that follow these unfinished heads wait again."""
    if not heads:
        return 0
    behind = Q()
    for (key, subscriber), head in heads.items():
        behind |= Q(key=key, subscriber=subscriber, pk__gt=head)
    return (
        OutboxEvent.objects.using(using)
        .filter(behind, status=Status.PENDING, waiting=False)
        .update(waiting=True)
    )


def lock_unfinished(keys: Collection[str], using: str) -> None:
    """Lock the unfinished events of these keys, waiting for claims in flight.

    Call after lock_keys(). A claim takes rows with SKIP LOCKED, so once this
    returns, no worker can start one of these events until the transaction
    ends, and a claim that was in flight has committed and is seen.
    """
    if keys:
        list(
            OutboxEvent.objects.using(using)
            .filter(key__in=keys, status__in=UNFINISHED)
            .order_by("id")
            .select_for_update()
            .values_list("id", flat=True)
        )


def rejoin(event: OutboxEvent, using: str) -> bool:
    """Place a keyed event an operator re-opens in its key's queue.

    Call with the key locked (lock_keys, lock_unfinished). A key's head is
    always its earliest unfinished event (promote_heads and the orphan sweep
    rely on it), so the event waits behind an earlier unfinished event, or
    becomes the head and holds back the later pending ones. A later event
    already processing cannot be held back: return False, and the event must
    not be re-opened now. Set event.waiting and return True otherwise.
    """
    others = (
        OutboxEvent.objects.using(using)
        .unfinished_of_lane(event.key, event.subscriber)
        .exclude(pk=event.pk)
    )
    if others.filter(pk__gt=event.pk, status=Status.PROCESSING).exists():
        return False
    event.waiting = others.filter(pk__lt=event.pk).exists()
    if not event.waiting:
        hold_back_behind({lane_of(event): event.pk}, using)
    return True


def promote_orphaned_heads(using: str) -> int:
    """Give every lane with unfinished events a claimable head again.

    The backstop for a worker that died between finishing a lane's head and
    promoting the next one. It scans all unfinished keyed events, so workers
    run it once per lease period, not on every tick. Lanes whose key's lock
    someone holds (a publisher, an operator's retry) are left for the next
    sweep.
    """
    heads = (
        OutboxEvent.objects.using(using)
        .filter(status__in=UNFINISHED)
        .exclude(key="")
        .values("key", "subscriber")
        .annotate(head=Min("id"))
        .values("head")
    )
    with transaction.atomic(using=using):
        orphaned: set[Lane] = set(
            OutboxEvent.objects.using(using)
            .filter(pk__in=Subquery(heads), waiting=True)
            .values_list("key", "subscriber")
        )
        return promote_heads(orphaned - busy_lanes(orphaned, using), using)
