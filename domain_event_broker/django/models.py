"""The transactional outbox table (see :mod:`domain_event_broker.django.outbox`)."""

from __future__ import annotations

from django.db import models
from django.utils import timezone


class OutboxEvent(models.Model):
    """A domain event written in the caller's transaction, waiting for the relay.

    ``body`` is the event's JSON as :func:`~domain_event_broker.django.outbox.publish_via_outbox`
    wrote it. The relay decodes it into a :class:`~domain_event_broker.DomainEvent` and
    publishes that event, encoded again (keys the event format does not know are
    dropped; a body that is no event is set aside, see below). ``routing_key`` and
    ``uuid_string`` are copies for operators. ``sent_at`` is set once the
    broker confirmed the event. Rows are relayed in ``id`` order.
    ``trace_context`` (4.1) lets the relay's publish continue the trace of
    the request that wrote the row.

    A row the relay cannot publish (its body is not a domain event, or its
    event is larger than the broker's ``max_message_size``) is set aside:
    ``failed_at`` and ``failure_reason`` say when and why, and the relay goes
    on with the rows after it. ``relay_domain_events
    --list-failed`` shows such rows, ``--retry-failed`` makes them pending
    again.

    .. versionadded:: 4.0
    .. versionadded:: 4.1 ``failed_at`` and ``failure_reason``.
    """

    id = models.BigAutoField(primary_key=True)
    routing_key = models.CharField(max_length=255)
    uuid_string = models.CharField(max_length=255)
    body = models.TextField()
    created_at = models.DateTimeField(default=timezone.now)
    sent_at = models.DateTimeField(null=True, blank=True)
    #: The W3C trace context of the code that wrote the row, as JSON AMQP
    #: headers (``traceparent``, ``tracestate``); empty when not tracing.
    trace_context = models.TextField(blank=True, default="")
    failed_at = models.DateTimeField(null=True, blank=True)
    failure_reason = models.TextField(blank=True, default="")

    class Meta:
        db_table = "domain_event_broker_outbox"
        verbose_name = "outbox event"
        indexes = [  # noqa: RUF012  # Django reads Meta attributes; never mutated
            # The relay's query: pending rows in id order.
            models.Index(
                fields=["id"],
                condition=models.Q(sent_at__isnull=True),
                name="deb_outbox_pending",
            ),
            # Pruning: sent rows older than a cutoff.
            models.Index(fields=["sent_at"], name="deb_outbox_sent_at"),
        ]

    def __str__(self) -> str:
        if self.sent_at is not None:
            state = f"sent {self.sent_at:%Y-%m-%d %H:%M:%S}"
        elif self.failed_at is not None:
            state = f"failed {self.failed_at:%Y-%m-%d %H:%M:%S}"
        else:
            state = "pending"
        return f"{self.routing_key} {self.uuid_string} ({state})"
