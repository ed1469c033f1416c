"""A raw psycopg worker for the latency comparison: the least a worker can do.

    python benchmarks/raw_worker.py DATABASE_URL

LISTENs on the outbox's channel; on each notification it claims with one
UPDATE ... FOR UPDATE SKIP LOCKED ... RETURNING in autocommit (one short
transaction), then starts each handler: it stamps the start time into
benchmarks_handlerstart, as benchmark.clock does in our worker, and marks
the event completed. No retries, no leases kept, no fencing: a floor, not a
worker anyone should run.
"""

import select
import sys
import time

import psycopg

CLAIM = """
UPDATE outbox_outboxevent SET status = 'processing', attempts = attempts + 1,
       locked_by = 'raw', locked_until = now() + interval '60 seconds'
 WHERE id IN (SELECT id FROM outbox_outboxevent
               WHERE status = 'pending' AND NOT waiting AND available_at <= now()
               ORDER BY available_at, id LIMIT 32 FOR UPDATE SKIP LOCKED)
RETURNING id, uuid
"""


def main(database_url: str) -> None:
    listener = psycopg.connect(database_url, autocommit=True)
    listener.execute("LISTEN outbox_outboxevent")
    worker = psycopg.connect(database_url, autocommit=True)
    print("raw worker listening", flush=True)  # noqa: T201 - the parent waits for it
    while True:
        select.select([listener.fileno()], [], [], 1.0)
        for _ in listener.notifies(timeout=0):
            pass
        for event_id, uuid in worker.execute(CLAIM).fetchall():
            started = time.time()
            worker.execute(
                "INSERT INTO benchmarks_handlerstart (event_uuid, started_at)"
                " VALUES (%s, %s)",
                [uuid, started],
            )
            worker.execute(
                "UPDATE outbox_outboxevent SET status = 'completed',"
                " completed_at = now(), locked_until = NULL WHERE id = %s",
                [event_id],
            )


if __name__ == "__main__":
    main(sys.argv[1])
