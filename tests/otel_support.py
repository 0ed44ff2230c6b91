"""One OpenTelemetry SDK for the test process: in-memory spans and metrics.

OpenTelemetry's global providers can be set once per process, so every test
that looks at spans or metrics shares these. Tracing is switched on by
:func:`otel` (which also clears the spans) and off again by
:func:`tracing_off` after the test, so that the other tests of the suite,
run in the same process, see no trace headers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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


class _Switch:
    enabled = False


class _SwitchableTracer(trace.Tracer):
    """Delegates to the SDK's tracer while tracing is on; no span otherwise."""

    def __init__(self, real: trace.Tracer) -> None:
        self._real = real
        self._off = trace.NoOpTracer()

    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        return (self._real if _Switch.enabled else self._off).start_span(*args, **kwargs)

    @contextmanager
    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Iterator[trace.Span]:
        tracer = self._real if _Switch.enabled else self._off
        with tracer.start_as_current_span(*args, **kwargs) as span:
            yield span


class _SwitchableTracerProvider(trace.TracerProvider):
    def __init__(self, real: TracerProvider) -> None:
        self._real = real

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return _SwitchableTracer(self._real.get_tracer(*args, **kwargs))


def tracing_off() -> None:
    """Stop creating spans (until the next :func:`otel`)."""
    _Switch.enabled = False


_otel: Otel | None = None


def otel() -> Otel:
    """The process's in-memory SDK (installed on first use), tracing on,
    spans cleared."""
    global _otel
    if _otel is None:
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(_SwitchableTracerProvider(provider))
        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        _otel = Otel(exporter, reader, trace.get_tracer("tests"))
    _Switch.enabled = True
    _otel.spans.clear()
    return _otel
