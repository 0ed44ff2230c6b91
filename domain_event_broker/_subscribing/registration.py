"""What a handler is registered with, and how it asks for a retry.

These types sit below every module of the subscribing side (dispatch,
topology, the handler thread, the Subscriber facade) so none of them has to
import another to know what a handler is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from .._amqp import config as _config
from .._core import validate as _validate
from ..events import DomainEvent

__all__ = ["MAX_RETRY_DELAY", "Handler", "Registration", "Retry", "build_registration"]

#: Longest retry delay (seconds). A delay becomes a queue's ``x-message-ttl``
#: in milliseconds, and ``x-expires`` adds a margin to it; RabbitMQ refuses
#: either beyond 2**32 - 1 ms on some versions, so stay well below: 30 days.
MAX_RETRY_DELAY: Final = 30 * 24 * 3600.0

#: Most handler threads one handler may ask for.
MAX_CONCURRENCY: Final = 1000

Handler = Callable[[DomainEvent], object]


class Retry(Exception):  # 3.0.2's public name
    """Raise in a handler to have the event delivered again after ``delay`` seconds.

    After ``max_retries`` retries (see :meth:`Subscriber.register`) the event
    is dead-lettered, or discarded when the handler has no dead-letter queue.
    The delay has millisecond resolution; all retries of one handler with the
    same delay share one delay queue.

    Args:
        delay: seconds to wait, from 0 up to 30 days (:data:`MAX_RETRY_DELAY`).

    Raises:
        ValueError: ``delay`` is not a finite number in that range. Raised
            inside a handler, that is an ordinary handler error: the event is
            dead-lettered with it as the reason.
    """

    def __init__(self, delay: float = 10.0) -> None:
        if isinstance(delay, bool) or not isinstance(delay, (int, float)):
            raise ValueError(f"Retry delay must be a number of seconds, not {delay!r}")
        if not (math.isfinite(delay) and 0 <= delay <= MAX_RETRY_DELAY):
            raise ValueError(
                f"Retry delay must be between 0 and {MAX_RETRY_DELAY:.0f} seconds (30 days), "
                f"not {delay!r}"
            )
        super().__init__(delay)
        self.delay = float(delay)


# Its documented home (3.0.2's import path), also shown in dead letters'
# x-exception-type headers.
Retry.__module__ = "domain_event_broker.subscribe"


@dataclass(frozen=True)
class Registration:
    """One handler and the options it was registered with.

    ``queue_type`` ``None`` means: the configured default (see
    :func:`domain_event_broker.configure`), else the broker's.

    Raises:
        ValueError: an unknown ``queue_type`` (a ConfigurationError), or a quorum queue that is not
            durable, or exclusive, or auto-delete (quorum queues cannot be).
    """

    handler: Handler
    name: str
    binding_keys: tuple[str, ...]
    dead_letter: bool = False
    durable: bool = True
    exclusive: bool = False
    auto_delete: bool = False
    max_retries: int = 0
    #: How many events of this handler run at once, each on its own thread.
    concurrency: int = 1
    queue_type: str | None = None

    def __post_init__(self) -> None:
        _config.check_queue_type(self.queue_type, "queue_type")
        if self.queue_type == "quorum" and (not self.durable or self.exclusive or self.auto_delete):
            raise ValueError(
                "a quorum queue is always durable, never exclusive nor auto-delete: "
                "register with durable=True, exclusive=False, auto_delete=False"
            )


def build_registration(
    handler: Handler,
    name: str,
    binding_keys: Sequence[str],
    dead_letter: bool = False,
    durable: bool = True,
    exclusive: bool = False,
    auto_delete: bool = False,
    max_retries: int = 0,
    concurrency: int = 1,
    queue_type: str | None = None,
) -> Registration:
    """Check what ``Subscriber.register()`` was given; return it as a Registration.

    Raises:
        TypeError: ``handler`` is not callable, ``binding_keys`` not a list.
        ValueError: any other argument is out of range.
        ConfigurationError: ``name`` starts with ``amq.`` (reserved by RabbitMQ),
            or ``queue_type`` is unknown.
    """
    if not callable(handler):
        raise TypeError(f"handler must be callable, not {type(handler).__name__}")
    # The shared boundary rules: nothing reaches pika that it cannot declare.
    name = _validate.handler_name(name)
    keys = _validate.binding_keys(binding_keys)
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries must be an int >= 0, not {max_retries!r}")
    if (
        isinstance(concurrency, bool)
        or not isinstance(concurrency, int)
        or not 1 <= concurrency <= MAX_CONCURRENCY
    ):
        raise ValueError(
            f"concurrency must be an int from 1 to {MAX_CONCURRENCY}, not {concurrency!r}"
        )
    return Registration(
        handler=handler,
        name=name,
        binding_keys=keys,
        dead_letter=bool(dead_letter),
        durable=bool(durable),
        exclusive=bool(exclusive),
        auto_delete=bool(auto_delete),
        max_retries=max_retries,
        concurrency=concurrency,
        queue_type=queue_type,
    )
