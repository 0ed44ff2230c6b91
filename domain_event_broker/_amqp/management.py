"""Listing a handler's delay queues through RabbitMQ's management HTTP API.

AMQP cannot list queues: a queue can only be looked up by its name, and a
delay queue's name holds its delay (``name-delay-<ms>``), which can be any
number of milliseconds. The management plugin's HTTP API can list them.
It is asked at the AMQP URL's host (``http`` on port 15672 for ``amqp://``,
``https`` on 15671 for ``amqps://``) with the URL's user, password and
virtual host, unless ``DOMAIN_EVENT_BROKER_MANAGEMENT`` names another base
URL (credentials may be given in it) or is ``off``. Any failure means "not
available": the caller then looks queues up by the delays it knows.

Why not a record kept by the Subscriber: delay queues are created by every
worker of a handler, 3.0.2's included, and expire on their own; only the
broker knows which exist now.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote, unquote, urlsplit

from . import names as _names
from .config import BrokerConfig

__all__ = ["delay_queue_delays", "delays_in_listing", "management_endpoints"]

log = logging.getLogger(__name__)

#: Environment variable naming the management API's base URL, or ``off``.
ENVIRONMENT_VARIABLE: Final = "DOMAIN_EVENT_BROKER_MANAGEMENT"
#: How long one request to the management API may take (seconds).
TIMEOUT: Final = 5.0
_PORTS: Final = {"amqp": ("http", 15672), "amqps": ("https", 15671)}


@dataclass(frozen=True)
class Endpoint:
    """Where to list a virtual host's queues, and as whom."""

    url: str
    user: str
    password: str = ""

    def __repr__(self) -> str:
        return f"Endpoint(url={self.url!r}, user={self.user!r})"


def management_endpoints(amqp_urls: Iterable[str], override: str | None = None) -> list[Endpoint]:
    """The queue listings to try, one per AMQP URL, in order.

    Args:
        amqp_urls: the broker's AMQP URLs (the nodes of one cluster).
        override: the management API's base URL (``http(s)://[user:password@]host:port``),
            ``"off"`` for none, or ``None`` to derive it from each AMQP URL.

    Returns:
        The endpoints (``.../api/queues/<vhost>?columns=name,arguments``).
    """
    endpoints: list[Endpoint] = []
    if override is not None and override.strip().lower() in {"off", "none", "0", "false"}:
        return endpoints
    for amqp_url in amqp_urls:
        parts = urlsplit(amqp_url)
        if parts.username is None:  # pika's default credentials
            user, password = "guest", "guest"
        else:
            user, password = unquote(parts.username), unquote(parts.password or "")
        vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        if override:
            base = urlsplit(override.strip().rstrip("/"))
            if base.username is not None:
                user, password = unquote(base.username), unquote(base.password or "")
            host = base.hostname or ""
            netloc = f"[{host}]" if ":" in host else host
            netloc += f":{base.port}" if base.port else ""
            root = f"{base.scheme}://{netloc}{base.path}"
        else:
            scheme, port = _PORTS.get(parts.scheme, ("http", 15672))
            host = parts.hostname or "localhost"
            netloc = f"[{host}]" if ":" in host else host
            root = f"{scheme}://{netloc}:{port}"
        url = f"{root}/api/queues/{quote(vhost, safe='')}?columns=name,arguments"
        endpoint = Endpoint(url, user, password)
        if endpoint not in endpoints:
            endpoints.append(endpoint)
        if override:
            break  # one override: one endpoint
    return endpoints


def delays_in_listing(name: str, listing: Iterable[Mapping[str, Any]]) -> list[int]:
    """The delays (ms) of handler ``name``'s delay queues in a queue listing.

    A queue counts when it is named and dead-letters as one of ``name``'s
    delay queues: 3.0.2's ``name-delay-<ms>`` into ``name-retry``, or 4.1's
    ``name-delay-<ms>-<classic|quorum>`` into ``name-retry-durable``. So
    another handler's queue whose name merely looks like one is left out.
    """
    prefix = re.escape(_names.delay_queue_prefix(name))
    kinds = [
        (re.compile(prefix + r"([0-9]+)"), _names.retry_exchange(name)),
        (
            re.compile(prefix + r"([0-9]+)-(?:" + "|".join(_names.QUEUE_TYPES) + ")"),
            _names.durable_retry_exchange(name),
        ),
    ]
    delays = set()
    for queue in listing:
        queue_name = queue.get("name")
        arguments = queue.get("arguments")
        if not isinstance(queue_name, str) or not isinstance(arguments, Mapping):
            continue
        for pattern, exchange in kinds:
            match = pattern.fullmatch(queue_name)
            if match and arguments.get("x-dead-letter-exchange") == exchange:
                delays.add(int(match.group(1)))
    return sorted(delays)


def _fetch(endpoint: Endpoint) -> list[Mapping[str, Any]]:
    # Imported here: urllib.request brings http.client and email, which
    # nothing else needs (a third of the package's import time).
    import urllib.request  # noqa: PLC0415

    if not endpoint.url.startswith(("http://", "https://")):
        raise ValueError(f"not an http(s) URL: {endpoint.url!r}")
    credentials = base64.b64encode(f"{endpoint.user}:{endpoint.password}".encode()).decode()
    headers = {"Authorization": f"Basic {credentials}"}
    request = urllib.request.Request(endpoint.url, headers=headers)  # noqa: S310  # checked above
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:  # noqa: S310
        listing = json.load(response)
    if not isinstance(listing, list):
        raise ValueError("the management API did not answer with a list of queues")
    return [queue for queue in listing if isinstance(queue, Mapping)]


def delay_queue_delays(config: BrokerConfig, name: str) -> list[int] | None:
    """The delays (ms) of handler ``name``'s delay queues that exist now.

    Returns:
        The delays, or ``None`` when no management API answered (not
        enabled, not reachable, refused the user, or turned off).
    """
    override = os.environ.get(ENVIRONMENT_VARIABLE)
    for endpoint in management_endpoints(config.urls, override):
        try:
            listing = _fetch(endpoint)
        except (OSError, ValueError) as exc:  # URLError and HTTPError are OSErrors
            log.info("The management API at %s did not list queues: %s", endpoint.url, exc)
            continue
        return delays_in_listing(name, listing)
    return None
