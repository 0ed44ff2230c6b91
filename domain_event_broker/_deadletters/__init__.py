"""Dead letters: looking at them, replaying, discarding, moving queues.

Owns dead letters as values, filters, summaries and export records
(``letters``), one run through a dead-letter queue without holding it
(``run``, with its broker side ``run_channel``, its transactions
``run_commit`` and what it works on ``run_items``), the operations built on a
run (``operations``) and moving a handler's queues to another queue type
(``migrate``). :mod:`domain_event_broker.replay` is its public face.

May import: :mod:`.._subscribing` (the handler topology), :mod:`.._amqp`
and everything below them.
"""
