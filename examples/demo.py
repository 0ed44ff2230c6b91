"""A tour of domain-event-broker against a running RabbitMQ (`make demo`).

1. publish ``user.registered`` and receive it in a handler;
2. a handler whose dependency is "down" asks for a delayed retry, and
   succeeds on the second attempt;
3. a handler that fails for good: the event is dead-lettered with the reason;
4. the operator fixes the bug and replays the dead letter.

Every queue the demo creates is deleted at the end. ``--trace`` prints the
OpenTelemetry spans of it all to the console (needs ``opentelemetry-sdk``).
"""

from __future__ import annotations

import logging
import sys
import uuid

from domain_event_broker import DomainEvent, Retry, Subscriber, publish_domain_event, replay_all
from domain_event_broker.replay import inspect_dead_letters

SUFFIX = uuid.uuid4().hex[:6]
WELCOME = f"demo-welcome-email-{SUFFIX}"
CRM = f"demo-crm-sync-{SUFFIX}"
BILLING = f"demo-billing-{SUFFIX}"


def say(text: str) -> None:
    print(text, flush=True)


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="  log %(levelname)s %(name)s: %(message)s")
    subscriber = Subscriber()
    billing_fixed = False

    def send_welcome_email(event: DomainEvent) -> None:
        say(
            f"  [{WELCOME}] welcome e-mail to {event.data['email']} (event {event.uuid_string[:8]})"
        )

    def sync_crm(event: DomainEvent) -> None:
        if event.retries == 0:
            say(f"  [{CRM}] CRM is down: Retry(0.2) (attempt {event.retries + 1})")
            raise Retry(0.2)
        say(f"  [{CRM}] CRM synced on attempt {event.retries + 1}")

    def open_billing_account(event: DomainEvent) -> None:
        if not billing_fixed:
            say(f"  [{BILLING}] bug! raising KeyError; the event goes to {BILLING}-dl")
            raise KeyError("plan")
        say(f"  [{BILLING}] billing account opened for {event.data['email']} (replayed)")

    subscriber.register(send_welcome_email, WELCOME, ["user.registered"])
    subscriber.register(sync_crm, CRM, ["user.*"], max_retries=3)
    subscriber.register(open_billing_account, BILLING, ["user.registered"], dead_letter=True)

    say("1. publish user.registered (returns once the broker confirmed it)")
    event = publish_domain_event("user.registered", {"email": "ada@example.com"})
    say(f"   published {event.routing_key} {event.uuid_string}")

    say("2. consume for 2 seconds: three handlers, one retry, one dead letter")
    logging.getLogger("domain_event_broker").setLevel(logging.CRITICAL)  # the demo narrates
    subscriber.start_consuming(timeout=2.0)

    dead_letters = inspect_dead_letters(BILLING)
    say(f"3. {BILLING}-dl holds {len(dead_letters)} dead letter(s); inspect shows why:")
    for letter in dead_letters:
        say(f"   {letter.routing_key} {letter.uuid_string}: {letter.reason}")

    say("4. the bug is fixed: replay the dead letters and consume again")
    billing_fixed = True
    remaining = replay_all(BILLING)
    say(f"   replay_all left {remaining} dead letter(s)")
    subscriber.start_consuming(timeout=1.5)

    channel = subscriber.channel
    assert channel is not None
    for queue in (WELCOME, CRM, BILLING, f"{BILLING}-dl"):
        channel.queue_delete(queue)
    for exchange in (f"{WELCOME}-retry", f"{CRM}-retry", f"{BILLING}-retry", f"{BILLING}-dlx"):
        channel.exchange_delete(exchange)
    subscriber.close()
    say("done: every event was handled, retried, or dead-lettered and replayed")
    return 0


def trace_to_console() -> None:
    """``--trace``: print every span (OpenTelemetry SDK, console exporter)."""
    from opentelemetry import trace  # noqa: PLC0415  # only with --trace (optional SDK)
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import (  # noqa: PLC0415
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)


if __name__ == "__main__":
    if "--trace" in sys.argv[1:]:  # needs: pip install opentelemetry-sdk
        trace_to_console()
    sys.exit(main())
