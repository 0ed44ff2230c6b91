"""What the OpenTelemetry hooks share, with OpenTelemetry or without it.

The types the hooks return, the outcomes they record, and the one
do-nothing object returned when OpenTelemetry is absent. Imports nothing of
OpenTelemetry.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Final, Literal, Protocol

#: What became of one delivery, as :meth:`ProcessHook.set_outcome` takes it.
Outcome = Literal["handled", "retry", "dead_letter", "discarded", "malformed", "requeued"]
OUTCOMES: Final = frozenset(
    {"handled", "retry", "dead_letter", "discarded", "malformed", "requeued"}
)

#: The W3C trace-context headers this module reads and writes.
TRACE_HEADERS: Final = ("traceparent", "tracestate")

INSTRUMENTATION_NAME: Final = "domain_event_broker"


class Scope(Protocol):
    """A context manager around one operation (a span, when tracing)."""

    def __enter__(self) -> Any: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class ProcessHook(Scope, Protocol):
    """What :func:`process_span` returns (see the module docstring)."""

    def set_outcome(
        self, outcome: Outcome, *, delay_ms: int | None = None, exception_type: str | None = None
    ) -> None: ...

    def settle(self, operation: str) -> AbstractContextManager[Any]: ...


class _Noop:
    """The one object every hook returns when OpenTelemetry is absent."""

    __slots__ = ()

    def __enter__(self) -> _Noop:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def set_outcome(
        self, outcome: Outcome, *, delay_ms: int | None = None, exception_type: str | None = None
    ) -> None:
        """Record the delivery's outcome (nothing to record here)."""

    def settle(self, operation: str) -> _Noop:
        """A settle span (none here)."""
        return self


NOOP: Final = _Noop()


def validate_outcome(outcome: str) -> None:
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {sorted(OUTCOMES)}, not {outcome!r}")
