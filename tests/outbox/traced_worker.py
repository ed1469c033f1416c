"""Run run_outbox_worker with an OpenTelemetry SDK provider; write its spans.

    python -m tests.outbox.traced_worker SPANS.json [run_outbox_worker options]

The provider keeps every span in memory; once the command returns (--drain,
a stop signal) or raises, the finished ones are written to SPANS.json as a
JSON list of ReadableSpan.to_json().
"""

import json
import sys
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)


def main(output: Path, arguments: list[str]) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)

    import django

    django.setup()
    from django.core.management import call_command

    try:
        call_command("run_outbox_worker", *arguments)
    finally:
        spans = [json.loads(span.to_json()) for span in exporter.get_finished_spans()]
        output.write_text(json.dumps(spans))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
