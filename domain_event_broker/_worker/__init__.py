"""``domain-event-broker worker`` and ``health``: subscribers run in production.

Owns loading the subscriber factory, the supervisor of worker processes,
logging set-up, the metrics endpoint and the health check.

May import: :mod:`.._subscribing`, :mod:`.._telemetry` and everything below.
"""
