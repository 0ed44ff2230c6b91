"""Publishing: how events reach the broker, confirmed.

Owns the publisher (``publisher``: :class:`Publisher` and the per-process
pool behind :func:`publish_domain_event`), the retry loop around each publish
(``sender``) and batches with their confirms taken as they come (``batch``).
:mod:`domain_event_broker.publish` is its public face.

May import: :mod:`.._amqp` and everything below it.
"""
