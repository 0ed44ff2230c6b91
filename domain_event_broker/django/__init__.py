"""Django integration: the ``DOMAIN_EVENT_BROKER`` setting, publishing on
commit, and a transactional outbox.

Add ``"domain_event_broker.django"`` to ``INSTALLED_APPS``. The outbox names
(:func:`publish_via_outbox`, :func:`prune_sent_events`, :class:`OutboxRelay`)
are imported lazily, because they need Django's app registry to be ready.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .transaction import publish_on_commit

if TYPE_CHECKING:
    from .outbox import prune_sent_events, publish_via_outbox
    from .relay import OutboxRelay

__all__ = ["OutboxRelay", "prune_sent_events", "publish_on_commit", "publish_via_outbox"]

_LAZY = {
    "publish_via_outbox": "outbox",
    "prune_sent_events": "outbox",
    "OutboxRelay": "relay",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{module}"), name)
