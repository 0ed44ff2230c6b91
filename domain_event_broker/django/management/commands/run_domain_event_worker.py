"""``manage.py run_domain_event_worker MODULE:ATTRIBUTE``: the worker command,
with Django set up first (see ``domain-event-broker worker``).

.. versionadded:: 4.1
"""

from __future__ import annotations

import os
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ...._cli import worker as _worker_command
from ...._worker.runner import EXIT_CONFIGURATION, run_worker
from ....errors import ConfigurationError


class Command(BaseCommand):
    help = (
        "Run a domain event Subscriber defined in your project (MODULE:ATTRIBUTE: a "
        "Subscriber, or a function returning one) until SIGTERM or SIGINT, optionally "
        "in several supervised processes, with a health file and Prometheus metrics."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        _worker_command.add_worker_arguments(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        worker_options = _worker_command.options_from(options)
        # Children run this same management command, through the same
        # manage.py (or django-admin), so each sets Django up first.
        command = [*_this_program(), "run_domain_event_worker"]
        if options.get("settings"):
            command.append(f"--settings={options['settings']}")
        if options.get("pythonpath"):
            command.append(f"--pythonpath={options['pythonpath']}")
        try:
            status = run_worker(worker_options, command)
        except ConfigurationError as exc:
            raise CommandError(str(exc), returncode=EXIT_CONFIGURATION) from exc
        if status:
            sys.exit(status)


def _this_program() -> list[str]:
    """How this process was started: ``python manage.py`` (a script) or
    ``python -m django`` (a module: running its file would put the
    package's own directory first on the import path)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return [sys.executable, "-m", spec.name.removesuffix(".__main__")]
    return [sys.executable, os.path.abspath(sys.argv[0])]
