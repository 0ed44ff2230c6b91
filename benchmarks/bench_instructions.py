"""Client CPU per confirmed publish and per delivery, in instructions: repeatable
on a busy machine.

Rates on a shared 2-core machine swing by a third from run to run; the
instructions a process executes do not. This runs each side in a fresh
process under ``valgrind --tool=callgrind`` twice, publishing no events and
then ``--events`` events (confirmed, persistent, one at a time), and prints
the difference per event:

* ``raw pika``: ``basic_publish`` of one pre-encoded body with only
  ``delivery_mode`` set, on a channel in confirm mode (as ``bench_publish.py``);
* ``raw pika, same events``: building each event as an application must (a
  ``DomainEvent``, its JSON body, ``content_type``, ``message_id`` and
  ``timestamp``), then the same;
* ``publish_domain_event``: the library with its defaults.

With ``--consume``, the same for draining a queue filled beforehand (the
difference between draining 200 and 200 + ``--events`` events):

* ``raw pika``: ``basic_consume`` with prefetch 200, ``json.loads`` of each
  body, one ``basic_ack`` each (as ``bench_subscribe.py``);
* ``Subscriber``: the defaults and a no-op handler; both its threads count.

Only user-space instructions of the client are counted: not the kernel's
work for the socket (where the library's one write per message and one read
per wakeup save system calls), nor the broker's. Skipped, with a message,
when valgrind is missing.

Usage: python benchmarks/bench_instructions.py [--events 500] [--consume]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import textwrap
import uuid

import pika
from bench_subscribe import fill

from domain_event_broker import Subscriber

URL = os.environ.get("DOMAIN_EVENT_BROKER", "amqp://guest:guest@localhost:5672/%2F").split(",")[0]

CHILD = textwrap.dedent(
    """
    import json, sys, time, uuid
    import pika
    from domain_event_broker import DomainEvent, publish_domain_event
    mode, count, url = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    KEY = "bench.instructions"
    if mode == "library":
        publish = lambda n: publish_domain_event(KEY, {"n": n})  # DOMAIN_EVENT_BROKER
    else:
        connection = pika.BlockingConnection(pika.URLParameters(url))
        channel = connection.channel()
        channel.confirm_delivery()
        channel.exchange_declare("domain-events", "topic", durable=True)
        body = json.dumps(DomainEvent(KEY, {"n": 0}).event_data).encode()
        minimal = pika.BasicProperties(delivery_mode=2)
        if mode == "raw":
            publish = lambda n: channel.basic_publish("domain-events", KEY, body, minimal)
        else:
            def publish(n):
                event = DomainEvent(KEY, {"n": n})
                properties = pika.BasicProperties(
                    delivery_mode=2,
                    content_type="application/json",
                    message_id=event.uuid_string,
                    timestamp=int(event.timestamp),
                )
                channel.basic_publish(
                    "domain-events", KEY, json.dumps(event.event_data).encode(), properties
                )
    publish(-1)  # connected, warm
    for n in range(count):
        publish(n)
    """
)

CONSUMER = textwrap.dedent(
    """
    import json, sys
    import pika
    from domain_event_broker import Subscriber
    mode, count, url, queue = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    received = 0
    if mode == "raw":
        connection = pika.BlockingConnection(pika.URLParameters(url))
        channel = connection.channel()
        channel.basic_qos(prefetch_count=200)
        def on_message(ch, method, properties, body):
            global received
            json.loads(body)
            ch.basic_ack(method.delivery_tag)
            received += 1
            if received == count:
                ch.stop_consuming()
        channel.basic_consume(queue, on_message)
        channel.start_consuming()
        connection.close()
    else:
        subscriber = Subscriber(url)
        def handler(event):
            global received
            received += 1
            if received == count:
                subscriber.stop_consuming()
        subscriber.register(handler, queue, [queue])
        subscriber.start_consuming(timeout=600)
    """
)

SIDES = {
    "raw": "raw pika",
    "raw-same": "raw pika, same events",
    "library": "publish_domain_event",
}


def instructions(mode: str, count: int, child: str = CHILD, *extra: str) -> int:
    """Instructions the child process executed (callgrind's total)."""
    result = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            "-c",
            child,
            mode,
            str(count),
            URL,
            *extra,
        ],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "DOMAIN_EVENT_BROKER": URL},
    )
    found = re.search(r"Collected : (\d+)", result.stderr)
    if result.returncode or found is None:
        sys.exit(f"{mode}: the child failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    return int(found.group(1))


def consumed_instructions(mode: str, count: int) -> int:
    """Instructions a child executed draining ``count`` events (its queue is
    declared as the Subscriber declares it, and filled, beforehand)."""
    queue = f"bench-instructions-{uuid.uuid4().hex[:8]}"
    declaring = Subscriber(URL)
    declaring.register(lambda event: None, queue, [queue])  # its queue, as it declares it
    declaring.close()
    connection = pika.BlockingConnection(pika.URLParameters(URL))
    channel = connection.channel()
    try:
        fill(channel, queue, queue, count)  # bound with its own name as the key
        return instructions(mode, count, CONSUMER, queue)
    finally:
        channel.queue_delete(queue)
        connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--consume", action="store_true", help="also count a delivery's")
    args, _ = parser.parse_known_args()  # run_all.py passes every benchmark's options
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: skipped (apt install valgrind)")
        return
    per_event = {}
    for mode in SIDES:
        base = instructions(mode, 0)
        per_event[mode] = (instructions(mode, args.events) - base) / args.events
    print(f"client instructions per confirmed publish ({args.events} events, callgrind):")
    for mode, label in SIDES.items():
        print(f"  {label:24s} {per_event[mode] / 1000:7.0f} k")
    library = per_event["library"]
    print(
        f"ratio raw pika / library: {per_event['raw'] / library:.2f}; "
        f"raw pika publishing the same events / library: {per_event['raw-same'] / library:.2f}"
    )

    if not args.consume:
        return
    per_delivery = {}
    for mode in ("raw", "library"):
        base = consumed_instructions(mode, 200)
        per_delivery[mode] = (consumed_instructions(mode, 200 + args.events) - base) / args.events
    print(f"client instructions per delivery ({args.events} events, callgrind):")
    print(f"  {'raw pika':24s} {per_delivery['raw'] / 1000:7.0f} k")
    print(f"  {'Subscriber':24s} {per_delivery['library'] / 1000:7.0f} k")
    print(f"ratio raw pika / Subscriber: {per_delivery['raw'] / per_delivery['library']:.2f}")


if __name__ == "__main__":
    main()
