"""``domain-event-broker worker`` and ``health``: their options and commands.

The work itself is :mod:`domain_event_broker._worker`'s; this module turns
command-line arguments into :class:`~domain_event_broker._worker.runner.WorkerOptions`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from .._telemetry.heartbeat import DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_STALL_AFTER
from .._worker.runner import (
    ALL_INTERFACES,
    DEFAULT_MAX_RESTARTS,
    EXIT_FAILED,
    EXIT_OK,
    WorkerOptions,
    check_health,
    run_worker,
)
from . import arguments as _arguments

__all__ = ["add_parsers", "add_worker_arguments", "options_from"]


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``worker`` options (shared with the Django management command)."""
    parser.add_argument(
        "spec",
        metavar="MODULE:ATTRIBUTE",
        help="a Subscriber, or a function returning one, e.g. myapp.workers:subscriber",
    )
    parser.add_argument(
        "--processes", type=_arguments.positive_int, default=1, help="worker processes (default: 1)"
    )
    parser.add_argument(
        "--health-file",
        type=Path,
        help="touched every few seconds while connected and not stalled (see `health`)",
    )
    parser.add_argument(
        "--health-interval",
        type=_arguments.positive_seconds,
        default=DEFAULT_HEARTBEAT_INTERVAL,
        metavar="SECONDS",
        help="seconds between two touches of the health file (default: %(default)g)",
    )
    parser.add_argument(
        "--stall-after",
        type=_arguments.positive_seconds,
        default=DEFAULT_STALL_AFTER,
        metavar="SECONDS",
        help="a handler busy this long on one event stops the heartbeat (default: %(default)g)",
    )
    parser.add_argument(
        "--metrics-port",
        type=_arguments.port,
        help="serve metrics for Prometheus on this port (child i: PORT+i)",
    )
    parser.add_argument(
        "--metrics-host",
        default=ALL_INTERFACES,
        help="address to serve metrics on (default: all)",
    )
    parser.add_argument(
        "--max-restarts",
        type=_arguments.non_negative_int,
        default=DEFAULT_MAX_RESTARTS,
        help="restarts of a failing worker in a row before giving up (default: %(default)s)",
    )
    parser.add_argument(
        "--log-format", choices=["text", "json"], default="text", help="log line format"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)


def options_from(args: argparse.Namespace | dict[str, Any]) -> WorkerOptions:
    """:class:`WorkerOptions` from parsed arguments (a namespace or a dict)."""
    values = vars(args) if isinstance(args, argparse.Namespace) else args
    extra_env = {}
    if values.get("url"):
        extra_env["DOMAIN_EVENT_BROKER"] = values["url"]
    return WorkerOptions(
        spec=values["spec"],
        processes=values["processes"],
        health_file=values.get("health_file"),
        health_interval=values["health_interval"],
        stall_after=values["stall_after"],
        metrics_port=values.get("metrics_port"),
        metrics_host=values["metrics_host"],
        max_restarts=values["max_restarts"],
        log_format=values["log_format"],
        child=values.get("child", False),
        extra_env=extra_env,
    )


def _cmd_worker(args: argparse.Namespace, out: TextIO) -> int:
    options = options_from(args)
    if options.extra_env:  # --url: the default broker of this process and its children
        os.environ.update(options.extra_env)
    return run_worker(options, [sys.executable, "-m", "domain_event_broker", "worker"])


def _cmd_health(args: argparse.Namespace, out: TextIO) -> int:
    healthy, text = check_health(args.file, args.max_age)
    out.write(text + "\n")
    return EXIT_OK if healthy else EXIT_FAILED


def add_parsers(commands: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register ``worker`` and ``health`` on the CLI's subparsers."""
    worker = commands.add_parser(
        "worker", parents=parents, help="run a Subscriber defined in your code"
    )
    add_worker_arguments(worker)
    worker.set_defaults(run=_cmd_worker)

    health = commands.add_parser(
        "health", parents=parents, help="exit 1 when a worker's health file is stale"
    )
    health.add_argument("--file", type=Path, required=True, help="the worker's --health-file")
    health.add_argument(
        "--max-age",
        type=_arguments.positive_seconds,
        default=30.0,
        metavar="SECONDS",
        help="oldest acceptable heartbeat (default: %(default)g)",
    )
    health.set_defaults(run=_cmd_health)
