"""The ``domain-event-broker`` command-line tool, for operators.

::

    domain-event-broker [--url URL] [--connect-timeout SECONDS] [--verbose] COMMAND ...
    domain-event-broker --version

    publish ROUTING_KEY [JSON]   publish an event (JSON data from stdin if left out)
    inspect NAME [--limit N] [--json] [--summary [FILTERS]]
                                 show handler NAME's dead letters, leaving them
    replay NAME [--all] [--interactive] [--limit N] [FILTERS] [--dry-run]
                                 move dead letters back to handler NAME
    discard NAME (--all | FILTERS) [--limit N] [--export FILE] [--dry-run]
                                 remove dead letters for good
    export NAME FILE [FILTERS]   write dead letters to FILE (JSON lines), leaving them
    import NAME FILE             put exported dead letters back
    status NAME [--delay SECONDS] [--json]
                                 message and consumer counts of NAME's queues

FILTERS: ``--where exception=TYPE``, ``--where handler=NAME``,
``--routing-key PATTERN`` (``--where routing_key=PATTERN``), ``--older-than
AGE``, ``--newer-than AGE`` (ages such as ``90s``, ``15m``, ``1h``, ``2d``).

The broker is ``--url``, else the ``DOMAIN_EVENT_BROKER`` environment
variable, else ``amqp://guest:guest@localhost:5672/%2F``. Exit status: 0 on
success, 1 on an error, 2 on wrong usage, 130 when interrupted.

.. versionadded:: 4.0
"""

from __future__ import annotations

from ._cli.main import main

__all__ = ["main"]
