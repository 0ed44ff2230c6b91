"""Subscribing: handlers, their queues, and what happens to each delivery.

Owns what a handler is registered with and :class:`Retry`
(``registration``), its exchanges and queues (``topology``), the decision
for one delivery without I/O (``dispatch``), the handler threads
(``handler_threads``), carrying out outcomes on the channel (``settle``),
the consuming loop (``consume_loop``) and the :class:`Subscriber`
(``subscriber``). :mod:`domain_event_broker.subscribe` is its public face.

May import: :mod:`.._amqp` and everything below it; not publishing.
"""
