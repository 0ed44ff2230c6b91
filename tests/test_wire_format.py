"""The wire format, compared with what domain-event-broker 3.0.2 itself produces.

3.0.2 runs in a subprocess, imported straight from its wheel (a wheel is a zip
file, and 3.0.2 is pure Python), so it never mixes with this library. The
wheel is looked for in ``$DEB302_WHEEL``, in ``build/`` (``make compat``
downloads it there), in ``/tmp/deb302/``, and otherwise downloaded with pip.
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pika.adapters.blocking_connection import BlockingChannel

import domain_event_broker._publishing.publisher as publish_module
import domain_event_broker.events as events_module
from domain_event_broker import DomainEvent, publish_domain_event

from .helpers import raw_connection, wait_for

ROOT = Path(__file__).resolve().parent.parent
VERSION_302 = "3.0.2"
EXCHANGE = "domain-events"

Run302 = Callable[[str, Any], Any]


def find_302_wheel() -> Path | None:
    pattern = f"domain_event_broker-{VERSION_302}-*.whl"
    candidates = [os.environ.get("DEB302_WHEEL", "")]
    candidates += [
        *sorted(glob.glob(str(ROOT / "build" / "**" / pattern), recursive=True)),
        *sorted(glob.glob(f"/tmp/deb302/{pattern}")),
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    target = ROOT / "build" / "wheel-302"
    result = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "download", "-q", "--no-deps"),
            *("--dest", str(target), f"domain-event-broker=={VERSION_302}"),
        ],
        capture_output=True,
        timeout=300,
        check=False,
    )
    found = sorted(target.glob(pattern))
    return found[0] if result.returncode == 0 and found else None


@pytest.fixture(scope="session")
def run_302() -> Run302:
    """Run ``code`` under 3.0.2: it reads ``given`` and sets ``result``."""
    wheel = find_302_wheel()
    if wheel is None:
        message = f"domain-event-broker {VERSION_302}'s wheel is not available"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)

    def run(code: str, given: Any) -> Any:
        script = (
            textwrap.dedent(
                f"""
            import pickle, sys
            sys.path.insert(0, {str(wheel)!r})
            import domain_event_broker
            assert domain_event_broker.__version__ == {VERSION_302!r}
            assert domain_event_broker.__file__.startswith({str(wheel)!r})
            given = pickle.load(sys.stdin.buffer)
            """
            )
            + textwrap.dedent(code)
            + "\nsys.stdout.buffer.write(pickle.dumps(result))\n"
        )
        completed = subprocess.run(
            [sys.executable, "-I", "-c", script],
            input=pickle.dumps(given),
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert completed.returncode == 0, completed.stderr.decode()
        return pickle.loads(completed.stdout)

    return run


#: (routing_key, data, domain_object_id, uuid_string, timestamp)
CASES: list[tuple[Any, ...]] = [
    ("user.registered", {"name": "Ada", "id": 1}, "user-1", "2f1f0c4e-uuid", 1500000000.123456),
    ("user.registered", {"text": 'Zoë — ☃ 😀 "quoted" \\ \n tab\t'}, None, "u", 1.0),
    ("a.b", {"nested": {"list": [1, 2.5, None, True, False, "x"], "empty": {}}}, "", "u", 0),
    ("a.b", None, None, "u", 1700000000),
    ("a.b", [1, "two", 3.0], 42, "u", 1.0000000000000002),
    ("a.b", "just a string", None, "u", 1e20),
    ("a.b", {"big": 2**70, "neg": -1, "float": 1e-7}, None, "u", 1.5),
    # NaN and infinities are left out: 3.0.2 wrote them as non-standard JSON;
    # 4.1 refuses them (strict RFC 8259, see tests/test_boundaries.py).
    ("a.b", {"b": 1, "a": 2, "c": {"z": 0, "y": 1}}, None, "u", 3.5),
    ("ünïcode.kéy", {}, None, "u", 4.5),
]


def test_json_bytes_match_302_for_the_same_event(run_302: Run302) -> None:
    expected = run_302(
        """
        import json
        from domain_event_broker import DomainEvent
        # What 3.0.2's publish_domain_event sends: json.dumps(event.event_data).
        result = [json.dumps(DomainEvent(*case).event_data) for case in given]
        """,
        CASES,
    )
    ours = [DomainEvent(*case).to_json() for case in CASES]
    for case, mine, theirs in zip(CASES, ours, expected, strict=True):
        assert mine == theirs, case


strict_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**80), 2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    routing_key=st.text(min_size=1, max_size=30),
    data=strict_json,
    domain_object_id=st.none() | st.text(max_size=10) | st.integers(),
    timestamp=st.floats(0, 2e10) | st.integers(0, 2**40),
)
def test_the_body_is_what_json_dumps_writes_as_302_did(
    routing_key: str, data: Any, domain_object_id: Any, timestamp: float
) -> None:
    # 3.0.2 sent json.dumps(event.event_data); to_json keeps one C encoder
    # for every event: the text must not differ for any strict JSON.
    event = DomainEvent(routing_key, data, domain_object_id, "u", timestamp)
    assert event.to_json() == json.dumps(event.event_data)


def outcome(parse: Callable[[Any], Any], text: Any) -> tuple[str, Any]:
    try:
        return "value", parse(text)
    except (ValueError, TypeError, RecursionError) as exc:
        return type(exc).__name__, str(exc)


json_texts = st.one_of(
    strict_json.map(json.dumps),  # documents as anybody writes them
    st.tuples(
        st.sampled_from(["", " ", "\n", "\ufeff", "{", "[", '"']),
        strict_json.map(json.dumps),
        st.sampled_from(["", " ", "\t\n", "x", "}", "{}", ",1"]),
    ).map("".join),  # with whitespace, extra data or junk around them
    st.text(max_size=40),
)


@settings(max_examples=500, deadline=None)
@given(json_texts)
def test_bodies_are_parsed_as_json_loads_parses_them(text: str) -> None:
    # from_json scans an object text with one C scanner; for any text, str
    # or bytes, the value or the error must be json.loads's.
    expected = outcome(json.loads, text)
    assert outcome(events_module._decode, text) == expected
    assert outcome(events_module._decode, text.encode("utf-8", "surrogatepass")) == outcome(
        json.loads, text.encode("utf-8", "surrogatepass")
    )


def test_default_fields_look_like_302s(run_302: Run302) -> None:
    theirs = run_302(
        """
        import json
        from domain_event_broker import DomainEvent
        result = json.loads(json.dumps(DomainEvent(*given).event_data))
        """,
        ("a.b",),
    )
    mine = json.loads(DomainEvent("a.b").to_json())
    assert list(mine) == list(theirs)
    assert mine["data"] == theirs["data"] == {}
    assert mine["domain_object_id"] is theirs["domain_object_id"] is None
    assert isinstance(mine["timestamp"], float)
    assert isinstance(theirs["timestamp"], float)
    assert abs(mine["timestamp"] - theirs["timestamp"]) < 60  # both UTC Unix seconds
    assert len(mine["uuid_string"]) == len(theirs["uuid_string"]) == 36


def test_302_decodes_what_we_write_and_we_decode_what_302_writes(run_302: Run302) -> None:
    ours = [DomainEvent(*case).to_json() for case in CASES[:7]]
    theirs = run_302(
        """
        import json
        from domain_event_broker import DomainEvent
        result = {
            "decoded": [DomainEvent.from_json(body).event_data for body in given["ours"]],
            "written": [json.dumps(DomainEvent(*case).event_data) for case in given["cases"]],
        }
        """,
        {"ours": ours, "cases": CASES[:7]},
    )
    assert theirs["decoded"] == [DomainEvent(*case).event_data for case in CASES[:7]]
    for body, case in zip(theirs["written"], CASES[:7], strict=True):
        assert DomainEvent.from_json(body) == DomainEvent(*case)
        assert DomainEvent.from_json(body.encode("utf-8")) == DomainEvent(*case)


# -- on the wire ---------------------------------------------------------------------------


@pytest.fixture
def queue(broker_url: str) -> Iterator[str]:
    name = f"test-wire-{uuid.uuid4().hex[:10]}"
    connection = raw_connection()
    channel = connection.channel()
    channel.exchange_declare(EXCHANGE, exchange_type="topic", durable=True)
    channel.queue_declare(name, durable=True)
    channel.queue_bind(name, EXCHANGE, routing_key=f"{name}.#")
    connection.close()
    yield name
    connection = raw_connection()
    connection.channel().queue_delete(name)
    connection.close()
    publish_module.close_shared_publishers()


def read(channel: BlockingChannel, queue: str, count: int) -> list[Any]:
    messages: list[Any] = []

    def enough() -> bool:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is not None:
            messages.append((method, properties, body))
        return len(messages) >= count

    wait_for(enough, timeout=15, message=f"{count} messages in {queue}")
    return messages


def test_same_bytes_and_properties_on_the_wire_as_302(
    run_302: Run302, queue: str, broker_url: str, channel: BlockingChannel
) -> None:
    key = f"{queue}.created"
    case = (key, {"name": "Zoë", "n": [1, 2.5]}, "obj-1", str(uuid.uuid4()), 1700000000.25)
    run_302(
        """
        from domain_event_broker import publish_domain_event
        publish_domain_event(*given["case"], connection_settings=given["url"])
        result = None
        """,
        {"case": case, "url": broker_url},
    )
    ((method_302, properties_302, body_302),) = read(channel, queue, 1)
    publish_domain_event(*case)
    ((method, properties, body),) = read(channel, queue, 1)

    assert body == body_302
    assert list(json.loads(body)) == [
        "routing_key",
        "data",
        "domain_object_id",
        "uuid_string",
        "timestamp",
    ]
    assert (method.exchange, method.routing_key) == (method_302.exchange, method_302.routing_key)
    assert properties_302.delivery_mode == properties.delivery_mode == 2
    # Added in 4.0; 3.0.2 sets none of them (readers must not depend on them).
    assert (properties_302.content_type, properties_302.message_id) == (None, None)
    assert properties_302.timestamp is None
    assert properties.content_type == "application/json"
    assert properties.message_id == case[3]
    assert properties.timestamp == 1700000000
    assert properties.headers is None
    assert properties.content_encoding is None
