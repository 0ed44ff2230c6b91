"""Send and receive domain events via RabbitMQ.

The public API is what this module exports (see ``__all__``); the
submodules are implementation details, apart from the ``transport`` and
``replay`` modules kept for code written against 3.0.2.
"""

import logging as _logging
from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from ._config import UNSET, configure, reset_defaults
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
    TLSError,
    UnroutableError,
)
from .events import DomainEvent
from .publish import Publisher, publish_domain_event
from .replay import DISCARD, LEAVE, RETRY, replay_all, replay_event, retry_event
from .subscribe import Retry, Subscriber

try:
    __version__ = _version("domain-event-broker")
except _PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

_logging.getLogger(__name__).addHandler(_logging.NullHandler())

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
    "DeadLetterQueueNotFoundError",
    "DomainEvent",
    "DomainEventBrokerError",
    "HandlerThreadError",
    "MalformedEventError",
    "PublishError",
    "PublishTimeoutError",
    "Publisher",
    "Retry",
    "Subscriber",
    "TLSError",
    "UnroutableError",
    "__version__",
    "configure",
    "publish_domain_event",
    "replay_all",
    "replay_event",
    "reset_defaults",
    "retry_event",
]
