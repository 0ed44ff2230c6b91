"""What a running library tells the outside: log fields, heartbeat, traces and metrics.

Owns the structured log fields (``log_fields``), the health-file heartbeat
(``heartbeat``) and the OpenTelemetry hooks (``otel``, the one module that
imports ``opentelemetry``, and only when tracing or metrics are used).
:mod:`domain_event_broker.telemetry` is its public face.

May import: the standard library and :mod:`.._core`.
"""
