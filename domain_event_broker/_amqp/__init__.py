"""Everything that speaks AMQP: the layer a port to pika 2 would replace.

Owns broker URLs and configuration (``config``), TLS (``tls``), opening
connections with backoff (``connect``), the long-lived connection and
channel of a publisher or consumer (``link``), the names and arguments of a
handler's exchanges and queues (``names``), "does it exist" probes
(``probes``; reply codes are ``pika.spec``'s), pika errors translated into this library's
(``failures``), RabbitMQ's management HTTP API (``management``), and
``pika_internals``: the one module of the package that touches pika's
private names.

May import: pika, the standard library, :mod:`.._core`, :mod:`.._telemetry`,
:mod:`..events` and :mod:`..errors`.
"""
