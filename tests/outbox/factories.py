"""Factories for the outbox's own tests.

They live here rather than in tests/factories.py, which imports the reference
application's models: the outbox's tests also run without it (Django 5.2 run).
"""

from datetime import timedelta

import factory
from django.utils import timezone

from outbox.models import OutboxEvent, OutboxWorker, Status


class OutboxEventFactory(factory.django.DjangoModelFactory[OutboxEvent]):
    """An unkeyed event; publish() keyed ones, so their waiting flag is right."""

    event_type = "test.event"
    payload = factory.LazyFunction(lambda: {"n": 1})
    max_attempts = 10

    class Meta:
        model = OutboxEvent

    class Params:
        failed = factory.Trait(
            status=Status.FAILED,
            attempts=10,
            failed_at=factory.LazyFunction(timezone.now),
            last_error="ConnectionError: smtp down",
            error_cause="ConnectionError: smtp down",
            history=factory.LazyFunction(
                lambda: [
                    {
                        "attempt": 10,
                        "at": timezone.now().isoformat(),
                        "worker": "host-1",
                        "error": "ConnectionError",
                        "message": "smtp down",
                    }
                ]
            ),
        )
        completed = factory.Trait(
            status=Status.COMPLETED,
            attempts=1,
            completed_at=factory.LazyFunction(timezone.now),
        )
        leased = factory.Trait(
            status=Status.PROCESSING,
            attempts=1,
            locked_by="host-1",
            locked_until=factory.LazyFunction(
                lambda: timezone.now() + timedelta(minutes=5)
            ),
        )


class OutboxWorkerFactory(factory.django.DjangoModelFactory[OutboxWorker]):
    worker_id = factory.Sequence(lambda n: f"host-{n}")
    hostname = "host"
    pid = factory.Sequence(lambda n: 1000 + n)
    last_seen_at = factory.LazyFunction(timezone.now)

    class Meta:
        model = OutboxWorker
