"""The root of the exception tree, and the errors of values.

:mod:`domain_event_broker.errors` re-exports these and draws the whole tree.
They live here, below :mod:`domain_event_broker.events`, so that the event
value object can raise them and ``errors`` can name the event type without
an import cycle.
"""

from __future__ import annotations

__all__ = ["ConfigurationError", "DomainEventBrokerError", "MalformedEventError"]


class DomainEventBrokerError(Exception):
    """Root of every exception raised by this library."""


class ConfigurationError(DomainEventBrokerError, ValueError):
    """A connection setting or option is invalid (e.g. a malformed AMQP URL)."""


class MalformedEventError(DomainEventBrokerError, ValueError):
    """A message body could not be decoded into a :class:`DomainEvent`."""


# Their public home: dead letters' ``x-exception-type`` headers and reprs
# have always named them ``domain_event_broker.errors.<name>``.
for _cls in (DomainEventBrokerError, ConfigurationError, MalformedEventError):
    _cls.__module__ = "domain_event_broker.errors"
