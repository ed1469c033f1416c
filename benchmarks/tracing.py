"""An OpenTelemetry SDK provider for the workers of the drain-1-traced workload.

What a traced deployment runs, less the network: spans are batched off the
worker's threads, as by an OTLP exporter, then dropped.
"""

from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)


class DiscardingExporter(SpanExporter):
    """Take every batch of spans and keep none."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def set_provider() -> None:
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(DiscardingExporter()))
    trace.set_tracer_provider(provider)
