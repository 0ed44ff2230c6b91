"""Receiving domain events: per-handler queues, delayed retries, dead letters.

:class:`Subscriber` is a facade over the parts of
:mod:`domain_event_broker._subscribing`, each with one job:

- ``registration``: what a handler is registered with, and :class:`Retry`;
- ``topology``: declaring a handler's exchanges and queues;
- ``dispatch``: the policy for one delivery (ack, retry, dead-letter),
  without I/O;
- ``handler_threads``: the supervised threads that run handlers;
- ``settle``: carrying out outcomes on the channel;
- ``consume_loop``: the consuming loop with reconnection;

on top of the connection link (:mod:`domain_event_broker._amqp.link`) and
graceful stop (:mod:`domain_event_broker._core.signals`), shared with the
other long-running parts of the library.

Threading model: the thread that calls :meth:`Subscriber.start_consuming`
is the I/O thread; it alone touches the pika connection and channel.
Handlers run on handler threads (one at a time, in delivery order, unless a
handler asks for ``concurrency``), so heartbeats keep flowing while a handler
is busy. Retries and dead letters are published with confirms *before* the
original delivery is acknowledged.
"""

from __future__ import annotations

from ._core.exports import claim
from ._subscribing.registration import Handler, Retry
from ._subscribing.subscriber import DEFAULT_PREFETCH_COUNT, Subscriber

__all__ = [
    "DEFAULT_PREFETCH_COUNT",
    "Handler",
    "Retry",
    "Subscriber",
]

claim(__name__, globals(), __all__)
