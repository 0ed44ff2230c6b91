"""Send and receive domain events via RabbitMQ.

The core API is what this module exports (see ``__all__``). These submodules
are public as well: ``events``, ``errors``, ``publish``, ``subscribe`` and
``replay`` (the richer dead-letter functions), ``transport`` (3.0.2's import
path), ``testing`` (a test double), ``telemetry`` (log fields and the
heartbeat), ``cli`` (the ``domain-event-broker`` command) and ``django`` (the
optional Django app). Modules and packages whose names start with an
underscore are implementation details.
"""

import importlib as _importlib
import logging as _logging
import os as _os
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from ._amqp.config import UNSET, ConnectionSettings, configure, reset_defaults
from ._core.version import __version__
from .errors import (
    AuthenticationError,
    BatchPublishError,
    BrokerError,
    BrokerUnavailableError,
    ConfigurationError,
    DeadLetterQueueNotFoundError,
    DomainEventBrokerError,
    HandlerThreadError,
    MalformedEventError,
    PublishError,
    PublishTimeoutError,
    SubscriberStoppingError,
    TLSError,
    UnroutableError,
)
from .events import DomainEvent
from .publish import Publisher, close_shared_publishers, publish_domain_event
from .subscribe import Handler, Retry, Subscriber

_logging.getLogger(__name__).addHandler(_logging.NullHandler())

#: The dead-letter tools, imported on first use (workers and publishers do
#: not need them): each name and the public module that holds it.
_ON_FIRST_USE = {
    "DISCARD": "replay",
    "LEAVE": "replay",
    "RETRY": "replay",
    "replay_all": "replay",
    "replay_event": "replay",
    "retry_event": "replay",
    "MigrationError": "_deadletters.migrate",
    "migrate_queue_type": "_deadletters.migrate",
}

if _TYPE_CHECKING:
    from ._deadletters.migrate import MigrationError, migrate_queue_type
    from .replay import DISCARD, LEAVE, RETRY, replay_all, replay_event, retry_event


def __getattr__(name: str) -> _Any:
    """The names of :data:`_ON_FIRST_USE`, imported when first asked for."""
    module = _ON_FIRST_USE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def _finish_imports_on_first_use() -> None:
    """Before a fork: finish every import this package defers to first use.

    A child forked while another thread is inside such an import would
    inherit that module's import lock held, and hang for good on its own
    first use. Waiting for the import here, in the parent, closes that.
    """
    for module in sorted(set(_ON_FIRST_USE.values())):
        _importlib.import_module(f"{__name__}.{module}")
    # pika resolves host names with socket.getaddrinfo(), which imports the
    # "idna" codec on first use: a child forked in the middle of that import
    # would find the codec half-made ("unknown encoding: idna").
    _importlib.import_module("encodings.idna")
    _importlib.import_module(f"{__name__}._subscribing.consume_loop")
    _importlib.import_module(f"{__name__}._telemetry.otel").load()


_os.register_at_fork(before=_finish_imports_on_first_use)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_ON_FIRST_USE))


__all__ = [
    "DISCARD",
    "LEAVE",
    "RETRY",
    "UNSET",
    "AuthenticationError",
    "BatchPublishError",
    "BrokerError",
    "BrokerUnavailableError",
    "ConfigurationError",
    "ConnectionSettings",
    "DeadLetterQueueNotFoundError",
    "DomainEvent",
    "DomainEventBrokerError",
    "Handler",
    "HandlerThreadError",
    "MalformedEventError",
    "MigrationError",
    "PublishError",
    "PublishTimeoutError",
    "Publisher",
    "Retry",
    "Subscriber",
    "SubscriberStoppingError",
    "TLSError",
    "UnroutableError",
    "__version__",
    "close_shared_publishers",
    "configure",
    "migrate_queue_type",
    "publish_domain_event",
    "replay_all",
    "replay_event",
    "reset_defaults",
    "retry_event",
]
