"""Compatibility module: 3.0.2 code imports ``domain_event_broker.transport``.

New code should import from ``domain_event_broker`` directly.
"""

from .publish import Publisher, publish_domain_event
from .subscribe import Retry, Subscriber

__all__ = ["Publisher", "Retry", "Subscriber", "publish_domain_event"]
