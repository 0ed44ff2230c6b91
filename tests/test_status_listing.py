"""``handler_status`` / ``status NAME``: delay queues listed by the management
API when it answers, looked up by delay otherwise, and the exchanges."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from domain_event_broker._amqp import names as _names
from domain_event_broker._amqp.management import (
    ENVIRONMENT_VARIABLE,
    delays_in_listing,
    management_endpoints,
)
from domain_event_broker.replay import handler_status

from .conftest import Names
from .helpers import BROKER_URL, raw_connection
from .replay_helpers import declare_handler

# Handler names as users write them, including characters that mean something
# in a regular expression.
handler_names = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40
)
url_text = st.characters(exclude_categories=("Cs",))  # anything UTF-8 can encode
delays_ms = st.sets(st.integers(min_value=0, max_value=30 * 24 * 3600 * 1000), max_size=8)


def delay_queue(name: str, ms: int, queue_type: str | None = None) -> dict[str, object]:
    """A listing entry of 3.0.2's delay queue, or of 4.1's of ``queue_type``."""
    if queue_type is None:
        return {
            "name": _names.delay_queue(name, ms),
            "arguments": _names.delay_queue_arguments(name, ms),
        }
    return {
        "name": _names.typed_delay_queue(name, ms, queue_type),
        "arguments": _names.typed_delay_queue_arguments(name, ms, queue_type),
    }


queue_kinds = st.sampled_from([None, *_names.QUEUE_TYPES])


@given(
    handler_names,
    st.dictionaries(st.integers(0, 30 * 24 * 3600 * 1000), queue_kinds, max_size=8),
    handler_names,
    delays_ms,
)
def test_delays_of_exactly_this_handler_are_found(
    name: str, delays: dict[int, str | None], other: str, other_delays: set[int]
) -> None:
    assume(other != name)
    listing = [
        {"name": name, "arguments": {}},
        {"name": _names.dead_letter_queue(name), "arguments": {}},
        *(delay_queue(name, ms, kind) for ms, kind in delays.items()),
        *(delay_queue(other, ms, kind) for ms in other_delays for kind in [None, "quorum"]),
        # Named like a delay queue of `name`, but another handler's inbox.
        {"name": _names.delay_queue(name, 7), "arguments": {"x-dead-letter-exchange": "x-dlx"}},
        {"name": _names.typed_delay_queue(name, 7, "quorum"), "arguments": {}},
        {
            # 4.1's name with 3.0.2's dead-letter exchange, and the reverse.
            "name": _names.typed_delay_queue(name, 8, "classic"),
            "arguments": _names.delay_queue_arguments(name, 8),
        },
        {
            "name": _names.delay_queue(name, 9),
            "arguments": _names.typed_delay_queue_arguments(name, 9, "classic"),
        },
        {"name": _names.delay_queue_prefix(name) + "7a", "arguments": {}},
        {"name": _names.delay_queue(name, 7) + "-stream", "arguments": {}},
    ]
    assert delays_in_listing(name, listing) == sorted(delays)


def test_4_1_delay_queues_are_found() -> None:
    listing = [delay_queue("a", 5, "classic"), delay_queue("a", 60000, "quorum")]
    assert delays_in_listing("a", listing) == [5, 60000]


def test_listing_entries_of_any_shape_are_skipped() -> None:
    listing = [{}, {"name": None}, {"name": "a-delay-5", "arguments": None}, delay_queue("a", 5)]
    assert delays_in_listing("a", listing) == [5]


@given(
    user=st.text(url_text, min_size=1, max_size=12),
    password=st.text(url_text, max_size=12),
    vhost=st.text(url_text, min_size=1, max_size=12),
    tls=st.booleans(),
)
def test_endpoint_derived_from_the_amqp_url(
    user: str, password: str, vhost: str, tls: bool
) -> None:
    scheme = "amqps" if tls else "amqp"
    url = (
        f"{scheme}://{quote(user, safe='')}:{quote(password, safe='')}@rabbit-1:5999/"
        f"{quote(vhost, safe='')}"
    )
    (endpoint,) = management_endpoints([url])
    base = "https://rabbit-1:15671" if tls else "http://rabbit-1:15672"
    assert endpoint.url == f"{base}/api/queues/{quote(vhost, safe='')}?columns=name,arguments"
    assert (endpoint.user, endpoint.password) == (user, password)
    assert repr(endpoint) == f"Endpoint(url={endpoint.url!r}, user={user!r})"  # no password


def test_endpoints_of_a_cluster_and_the_default_vhost() -> None:
    urls = ["amqp://u:p@rabbit-1/%2F", "amqp://u:p@rabbit-2", "amqp://u:p@rabbit-1/%2F"]
    assert [e.url for e in management_endpoints(urls)] == [
        "http://rabbit-1:15672/api/queues/%2F?columns=name,arguments",
        "http://rabbit-2:15672/api/queues/%2F?columns=name,arguments",
    ]


def test_endpoint_override_and_off() -> None:
    urls = ["amqp://u:p@rabbit-1/prod"]
    (endpoint,) = management_endpoints(urls, "https://ops:s%40cret@mgmt.internal:443/rabbit/")
    assert endpoint.url == "https://mgmt.internal:443/rabbit/api/queues/prod?columns=name,arguments"
    assert (endpoint.user, endpoint.password) == ("ops", "s@cret")
    (endpoint,) = management_endpoints(urls, "http://mgmt.internal:15672")
    assert (endpoint.user, endpoint.password) == ("u", "p")
    for off in ["off", "OFF", " none ", "0", "false"]:
        assert management_endpoints(urls, off) == []


# -- against the broker ----------------------------------------------------------------------


@pytest.fixture
def handler(names: Names) -> str:
    name = names.new("test-status")
    declare_handler(name)
    return name


@pytest.fixture
def delay_3700(handler: str) -> Iterator[str]:
    """A delay queue of an unusual delay (3.7 s), as a worker declares it."""
    queue = _names.delay_queue(handler, 3700)
    connection = raw_connection()
    channel = connection.channel()
    channel.queue_declare(
        queue, durable=True, arguments=_names.delay_queue_arguments(handler, 3700)
    )
    channel.basic_publish("", queue, b"{}")
    yield queue
    channel.queue_delete(queue)
    connection.close()


@pytest.fixture
def typed_delay_queues(handler: str) -> Iterator[list[str]]:
    """4.1's delay queues of unusual delays (4.2 s classic, 5.3 s quorum), as
    a worker declares them, holding 2 and 3 retries."""
    connection = raw_connection()
    channel = connection.channel()
    queues = []
    for ms, queue_type, count in [(4200, "classic", 2), (5300, "quorum", 3)]:
        queue = _names.typed_delay_queue(handler, ms, queue_type)
        channel.queue_declare(
            queue,
            durable=True,
            arguments=_names.typed_delay_queue_arguments(handler, ms, queue_type),
        )
        for _ in range(count):
            channel.basic_publish("", queue, b"{}")
        queues.append(queue)
    yield queues
    for queue in queues:
        channel.queue_delete(queue)
    connection.close()


def test_without_the_management_api_delays_are_looked_up(
    handler: str, delay_3700: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "off")

    status = handler_status(handler)
    assert status.delay_queues == ()
    assert not status.delay_queues_listed

    status = handler_status(handler, delays=[3.7])
    assert [(queue.name, queue.messages) for queue in status.delay_queues] == [(delay_3700, 1)]
    assert status.as_dict()["delay_queues_listed"] is False


def test_an_unreachable_management_api_is_no_error(
    handler: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "http://127.0.0.1:9/")  # the discard port
    status = handler_status(handler)
    assert status.queue.exists
    assert not status.delay_queues_listed


def test_exchanges_as_found(handler: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "off")
    retry, dlx = _names.retry_exchange(handler), _names.dead_letter_exchange(handler)
    assert handler_status(handler).exchanges == {retry: True, dlx: True}

    connection = raw_connection()
    connection.channel().exchange_delete(dlx)
    connection.close()

    status = handler_status(handler)
    assert status.exchanges == {retry: True, dlx: False}
    assert status.as_dict()["exchanges"] == [
        {"name": retry, "exists": True},
        {"name": dlx, "exists": False},
    ]


def _management_answers() -> bool:
    override = os.environ.get(ENVIRONMENT_VARIABLE)
    (endpoint,) = management_endpoints([BROKER_URL], override)[:1] or [None]
    if endpoint is None:
        return False
    try:
        with urllib.request.urlopen(endpoint.url.split("/api/")[0] + "/api/", timeout=2):
            return True
    except OSError:
        return False


#: Why the listing test may skip, and how to run it.
NO_MANAGEMENT = (
    "the broker's management API does not answer: enable the rabbitmq_management "
    "plugin, or point DOMAIN_EVENT_BROKER at a node that has it (e.g. a private "
    "node: write [rabbitmq_management]. into its enabled_plugins and "
    "management.tcp.port = PORT into its rabbitmq.conf before starting it) and "
    "DOMAIN_EVENT_BROKER_MANAGEMENT at http://127.0.0.1:PORT"
)


def test_with_the_management_api_every_delay_queue_is_listed(
    handler: str, delay_3700: str, typed_delay_queues: list[str]
) -> None:
    # DOMAIN_EVENT_BROKER_MANAGEMENT, when set, names the API of the broker
    # under test; else it is asked where the AMQP URL points.
    if not _management_answers():
        if os.environ.get("CI") and os.environ.get(ENVIRONMENT_VARIABLE):
            pytest.fail(NO_MANAGEMENT)
        pytest.skip(NO_MANAGEMENT)
    status = handler_status(handler)
    assert status.delay_queues_listed
    assert sorted((queue.name, queue.messages) for queue in status.delay_queues) == sorted(
        [(delay_3700, 1), (typed_delay_queues[0], 2), (typed_delay_queues[1], 3)]
    )


def test_status_command_says_how_delay_queues_were_found(handler: str, delay_3700: str) -> None:
    env = {**os.environ, "DOMAIN_EVENT_BROKER": BROKER_URL, ENVIRONMENT_VARIABLE: "off"}
    result = subprocess.run(
        [sys.executable, "-m", "domain_event_broker", "status", handler],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "management API did not answer" in result.stderr
    assert delay_3700 not in result.stdout

    result = subprocess.run(
        [sys.executable, "-m", "domain_event_broker", "status", handler, "--delay", "3.7"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert [line.split()[:3] for line in result.stdout.splitlines()][2] == [
        "delayed",
        "retries",
        delay_3700,
    ]
