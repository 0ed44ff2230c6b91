"""``manage.py replay_domain_event NAME... [--all] [--interactive]``.

Moves dead-lettered events back to their handlers, as in 3.0.2 (same
arguments, same output), with the library's safe replay underneath. The
``domain-event-broker`` command-line tool does the same outside Django.
"""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from domain_event_broker import replay
from domain_event_broker._cli.prompt import DEFAULT_ANSWER_TIMEOUT, InteractivePrompt
from domain_event_broker.errors import DomainEventBrokerError

#: Exit status after Ctrl-C (128 + SIGINT), as the ``domain-event-broker`` tool's.
INTERRUPTED = 130


class Command(BaseCommand):
    """Replay dead-lettered events of one or more handlers."""

    help = "Move dead-lettered event back into given subscriber queue"

    #: Seconds to wait for an answer in interactive mode before leaving the event.
    answer_timeout = DEFAULT_ANSWER_TIMEOUT

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("queue", nargs="+", type=str)
        parser.add_argument(
            "--all",
            action="store_true",
            dest="replay_all",
            default=False,
            help="Replay all events in dead letter queue.",
        )
        parser.add_argument(
            "--interactive",
            action="store_true",
            dest="interactive",
            default=False,
            help="Ask for desired action for each event.",
        )

    def _write(self, text: str, ending: str) -> None:
        self.stdout.write(text, ending=ending)
        self.stdout.flush()

    def handle(self, *args: Any, **options: Any) -> None:
        callback: replay.MessageCallback = replay.retry_event
        prompt: InteractivePrompt | None = None
        if options["interactive"]:
            callback = prompt = InteractivePrompt(self._write, timeout=self.answer_timeout)
        every = options["replay_all"]
        for queue in options["queue"]:
            try:
                result = replay.replay_dead_letters(
                    queue,
                    callback,
                    limit=None if every else 1,
                    on_progress=None if prompt is None else prompt.progress,
                )
            except replay.ReplayIncompleteError as exc:
                self.stdout.write(
                    f"{exc.result.remaining} dead-lettered events remaining for {queue}"
                )
                raise CommandError(str(exc)) from exc
            except DomainEventBrokerError as exc:
                raise CommandError(str(exc)) from exc
            except KeyboardInterrupt:
                # Ctrl-C at the prompt: what was answered is done, the rest
                # stays; one line and exit status 130, not a traceback.
                raise CommandError(
                    f"interrupted; unanswered events stay where they were in {queue}-dl",
                    returncode=INTERRUPTED,
                ) from None
            # As in 3.0.2: one event replayed does not count the event offered.
            remaining = result.remaining if every else max(0, result.remaining - result.left)
            self.stdout.write(f"{remaining} dead-lettered events remaining for {queue}")
