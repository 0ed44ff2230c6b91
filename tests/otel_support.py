"""One OpenTelemetry SDK for the test process: in-memory spans and metrics.

OpenTelemetry's global providers can be set once per process, so every test
that looks at spans or metrics shares these; :func:`otel` clears the spans.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


@dataclass
class Otel:
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader
    tracer: trace.Tracer

    def finished(self, name_prefix: str = "") -> list[ReadableSpan]:
        return [
            span for span in self.spans.get_finished_spans() if span.name.startswith(name_prefix)
        ]

    def points(self, metric_name: str) -> list[Any]:
        """The data points of one metric (all attribute sets)."""
        data = self.reader.get_metrics_data()
        found: list[Any] = []
        if data is None:
            return found
        for resource_metrics in data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    if metric.name == metric_name:
                        found.extend(metric.data.data_points)
        return found

    def total(self, metric_name: str, **attributes: Any) -> float:
        """Sum of a counter's points whose attributes include ``attributes``."""
        return sum(
            point.value
            for point in self.points(metric_name)
            if all(point.attributes.get(key) == value for key, value in attributes.items())
        )


_otel: Otel | None = None


def otel() -> Otel:
    """The process's in-memory SDK (installed on first use), spans cleared."""
    global _otel
    if _otel is None:
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        _otel = Otel(exporter, reader, trace.get_tracer("tests"))
    _otel.spans.clear()
    return _otel
