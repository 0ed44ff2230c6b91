"""Publishing domain events with publisher confirms over reused connections.

:class:`Publisher` owns one connection, shared (in turns) by the threads
using it. :func:`publish_domain_event` keeps a pool of publishers per
process and broker, so that threads publishing at the same moment each have
a connection, up to ``configure(max_connections=...)``.
:meth:`Publisher.publish_many` publishes a batch and waits for the broker's
confirms once, on a second channel of the publisher's connection.
"""

from __future__ import annotations

from ._core.exports import claim
from ._publishing.publisher import (
    Publisher,
    close_shared_publishers,
    publish_domain_event,
)

__all__ = [
    "Publisher",
    "close_shared_publishers",
    "publish_domain_event",
]

claim(__name__, globals(), __all__)
