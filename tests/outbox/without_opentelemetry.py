"""Publish and drain an event in a process that cannot import opentelemetry.

    python -m tests.outbox.without_opentelemetry

Prints one line of JSON: whether outbox.tracing saw OpenTelemetry, and what
became of the event. Run by tests/outbox/test_without_opentelemetry.py.
"""

import json
import sys

# Before anything imports it: `import opentelemetry` now raises ImportError,
# whether or not it is installed.
sys.modules["opentelemetry"] = None  # type: ignore[assignment]


def main() -> None:
    import django

    django.setup()
    from outbox import publish, tracing
    from outbox.models import OutboxEvent
    from outbox.testing import drain

    event = publish("outbox_testapp.record", {})
    result = drain()
    stored = OutboxEvent.objects.get(pk=event.pk)
    report = {
        "tracing_available": tracing.available(),
        "completed": result.completed,
        "status": stored.status,
        "trace_context": stored.trace_context,
    }
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
