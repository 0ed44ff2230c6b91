"""The transactional outbox end to end, in one script.

Run it from the repository root, with a RabbitMQ at DOMAIN_EVENT_BROKER (or
localhost)::

    make venv && .venv/bin/python examples/django_outbox/demo.py

It registers a user and writes ``demo.user.registered`` into the outbox in
the same transaction, shows that a rolled-back registration leaves no event,
runs the relay once, receives the event from a queue, and prunes the outbox.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from pathlib import Path

import django
import pika
from django.conf import settings
from django.core.management import call_command

BROKER_URL = os.environ.get("DOMAIN_EVENT_BROKER", "amqp://guest:guest@localhost:5672/%2F")
DATABASE = Path(tempfile.gettempdir()) / f"deb-outbox-demo-{uuid.uuid4().hex[:8]}.sqlite3"

settings.configure(
    SECRET_KEY="demo",
    USE_TZ=True,
    INSTALLED_APPS=[
        "django.contrib.contenttypes",
        "django.contrib.auth",
        "domain_event_broker.django",
    ],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(DATABASE)}},
    DOMAIN_EVENT_BROKER=BROKER_URL,
)
django.setup()

from django.contrib.auth.models import User  # noqa: E402  # needs django.setup()
from django.db import transaction  # noqa: E402

from domain_event_broker.django.models import OutboxEvent  # noqa: E402
from domain_event_broker.django.outbox import publish_via_outbox  # noqa: E402


def register(username: str, *, fail: bool = False) -> None:
    """Create a user and its event in one transaction; ``fail`` rolls both back."""
    with transaction.atomic():
        user = User.objects.create(username=username)
        publish_via_outbox(
            "demo.user.registered", {"username": username}, domain_object_id=str(user.pk)
        )
        if fail:
            raise RuntimeError(f"registering {username} failed after the event was written")


def main() -> None:
    call_command("migrate", verbosity=0)

    # A queue that receives the demo's events (a subscriber would do this).
    connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    channel = connection.channel()
    channel.exchange_declare("domain-events", exchange_type="topic", durable=True)
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, "domain-events", routing_key="demo.user.*")

    register("alice")
    try:
        register("bob", fail=True)
    except RuntimeError as exc:
        print(f"rolled back: {exc}")
    print(f"users: {list(User.objects.values_list('username', flat=True))}")
    print(f"outbox: {[str(row) for row in OutboxEvent.objects.order_by('id')]}")

    print("$ manage.py relay_domain_events --once")
    call_command("relay_domain_events", "--once")

    method, _, body = channel.basic_get(queue, auto_ack=True)
    assert method is not None, "the relay confirmed the event, so it must be in the queue"
    print(f"received: {json.dumps(json.loads(body), sort_keys=True)}")
    print(f"outbox: {[str(row) for row in OutboxEvent.objects.order_by('id')]}")

    print("$ manage.py prune_domain_events --days 0")
    call_command("prune_domain_events", "--days", "0")
    connection.close()


if __name__ == "__main__":
    try:
        main()
    finally:
        DATABASE.unlink(missing_ok=True)
