"""``domain-event-broker migrate``: move a handler's queues to another queue type."""

from __future__ import annotations

import argparse
from typing import TextIO

from .._amqp import config as _config
from .._amqp import names as _names
from .._deadletters.migrate import migrate_queue_type

__all__ = ["add_parser"]


def add_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], **kwargs: object
) -> None:
    """Add the ``migrate`` command to the command line's sub-commands."""
    migrate = commands.add_parser(
        "migrate",
        help="move a handler's queues to another queue type, losing nothing",
        description="Move handler NAME's queue and dead-letter queue to another queue type. "
        "Stop the handler's workers first; publishers may keep publishing.",
        **kwargs,  # type: ignore[arg-type]
    )
    migrate.add_argument("name", metavar="NAME", help="the handler (queue) name")
    migrate.add_argument(
        "--queue-type", required=True, choices=_names.QUEUE_TYPES, help="the new queue type"
    )
    migrate.add_argument(
        "--binding-key",
        action="append",
        required=True,
        metavar="KEY",
        help="a binding key of the handler, as given to register() (repeat for each)",
    )
    migrate.add_argument(
        "--exchange",
        default=_names.DEFAULT_EXCHANGE,
        help="the events exchange (default: %(default)s)",
    )
    migrate.set_defaults(run=_command)


def _command(args: argparse.Namespace, out: TextIO) -> int:
    def report(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    settings: _config.ConnectionSettings = _config.UNSET if args.url is None else args.url
    migrate_queue_type(
        args.name,
        args.queue_type,
        args.binding_key,
        settings,
        exchange=args.exchange,
        report=report,
    )
    return 0
