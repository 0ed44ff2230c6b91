"""Peers: the library, kombu and dramatiq against raw pika, on one broker, in one run.

Installs kombu and dramatiq (with its RabbitMQ extra) and this library into a
separate virtual environment, ``build/peers-venv`` (once; ``--reinstall`` to
redo it), then runs the measurements there, so that the table of issue 12 can
be redrawn by anyone:

* **publish**: ``--threads`` threads each publish their share of ``--events``
  persistent events with publisher confirms, to a durable queue: raw pika
  (one connection per thread, ``confirm_delivery()``), ``publish_domain_event``
  (its defaults), kombu (``confirm_publish=True``, one connection per thread),
  dramatiq (``RabbitmqBroker(confirm_delivery=True)``, ``actor.send``).
* **consume**: ``--events`` persistent events, filled before the clock starts,
  drained by raw pika (prefetch 200, one ack each), a ``Subscriber`` (defaults,
  a no-op handler), kombu (a ``Consumer``, prefetch 200, one ack each) and a
  dramatiq ``Worker`` (one thread, a no-op actor, its defaults: prefetch 2;
  started and connected beforehand, resumed when the clock starts).

Rounds alternate between the contenders; the rates compare total events over
total time, and each is printed as a ratio to raw pika.

Usage: python benchmarks/bench_peers.py [--threads 4] [--events 4000] [--rounds 3] [--reinstall]
"""

# ruff: noqa: PLC0415  # the peers are imported inside their own virtual environment only

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / "build" / "peers-venv"
PEERS = ["kombu", "dramatiq[rabbitmq]"]
URL = os.environ.get("DOMAIN_EVENT_BROKER", "amqp://guest:guest@localhost:5672/%2F").split(",")[0]
EXCHANGE = "domain-events"


def ensure_venv(reinstall: bool) -> Path:
    python = VENV / "bin" / "python"
    marker = VENV / ".installed"
    if reinstall or not marker.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, *PEERS], check=True)
        subprocess.run([*pip, "-e", str(REPO)], check=True)
        marker.write_text("ok\n")
    return python


# -- everything below runs inside the peers' virtual environment --------------------


def run_threads(threads: int, work: Callable[[int], None]) -> float:
    start = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def body(index: int) -> None:
        start.wait()
        try:
            work(index)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=body, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    start.wait()
    started = time.perf_counter()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started


class Bench:
    def __init__(self, threads: int, events: int) -> None:
        import pika

        self.pika = pika
        self.threads = threads
        self.events = events
        self.per_thread = max(1, events // threads)
        self.key = f"bench.peers{uuid.uuid4().hex[:8]}"
        self.queue = f"bench-peers-{uuid.uuid4().hex[:8]}"
        self.connection = pika.BlockingConnection(pika.URLParameters(URL))
        self.channel = self.connection.channel()
        self.channel.exchange_declare(EXCHANGE, exchange_type="topic", durable=True)
        self.channel.queue_declare(self.queue, durable=True)
        self.channel.queue_bind(self.queue, EXCHANGE, routing_key=self.key)
        self.body = json.dumps({"routing_key": self.key, "data": {"n": 0}}).encode()
        self._dramatiq: Any = None
        self._worker: Any = None

    def close(self) -> None:
        self.channel.queue_delete(self.queue)
        if self._worker is not None:
            self._worker.stop()
        if self._dramatiq is not None:
            broker, *actors = self._dramatiq
            for actor in actors:
                for suffix in ("", ".DQ", ".XQ"):
                    self.channel.queue_delete(f"{actor.queue_name}{suffix}")
            broker.close()
        self.connection.close()

    def purge(self) -> None:
        self.channel.queue_purge(self.queue)

    def fill(self) -> None:
        channel = self.connection.channel()
        channel.confirm_delivery()
        properties = self.pika.BasicProperties(delivery_mode=2, content_type="application/json")
        for n in range(self.events):
            body = json.dumps(
                {
                    "routing_key": self.key,
                    "data": {"n": n},
                    "domain_object_id": None,
                    "uuid_string": str(uuid.uuid4()),
                    "timestamp": time.time(),
                }
            )
            channel.basic_publish(EXCHANGE, self.key, body, properties)
        channel.close()

    # publishing ----------------------------------------------------------------------

    def publish_raw(self) -> float:
        pika = self.pika
        connections = [
            pika.BlockingConnection(pika.URLParameters(URL)) for _ in range(self.threads)
        ]
        channels = [connection.channel() for connection in connections]
        for channel in channels:
            channel.confirm_delivery()
        properties = pika.BasicProperties(delivery_mode=2)

        def work(index: int) -> None:
            for _ in range(self.per_thread):
                channels[index].basic_publish(EXCHANGE, self.key, self.body, properties)

        seconds = run_threads(self.threads, work)
        for connection in connections:
            connection.close()
        return seconds

    def publish_library(self) -> float:
        from domain_event_broker import publish_domain_event

        run_threads(self.threads, lambda index: publish_domain_event(self.key, {}))  # warm
        self.purge()

        def work(index: int) -> None:
            for n in range(self.per_thread):
                publish_domain_event(self.key, {"n": n})

        return run_threads(self.threads, work)

    def publish_kombu(self) -> float:
        from kombu import Connection, Exchange, Producer

        exchange = Exchange(EXCHANGE, type="topic", durable=True)
        connections = [
            Connection(_kombu_url(), transport_options={"confirm_publish": True})
            for _ in range(self.threads)
        ]
        producers = [
            Producer(connection.channel(), exchange=exchange) for connection in connections
        ]

        def work(index: int) -> None:
            for _ in range(self.per_thread):
                producers[index].publish(
                    self.body,
                    routing_key=self.key,
                    delivery_mode=2,
                    content_type="application/json",
                    content_encoding="utf-8",
                )

        seconds = run_threads(self.threads, work)
        for connection in connections:
            connection.release()
        return seconds

    def dramatiq(self) -> tuple[Any, Any, Any]:
        """The broker, an actor to publish to, and an actor to consume (own queues)."""
        if self._dramatiq is None:
            import dramatiq
            from dramatiq.brokers.rabbitmq import RabbitmqBroker

            broker = RabbitmqBroker(url=URL, confirm_delivery=True)
            dramatiq.set_broker(broker)
            self.handled = 0

            def noop(n: int) -> None:
                self.handled += 1

            actors = []
            for role in ("publish", "consume"):
                name = f"bench-peers-{role}-{uuid.uuid4().hex[:8]}"
                actors.append(dramatiq.actor(noop, actor_name=f"noop_{role}", queue_name=name))
                broker.declare_queue(name)
            self._dramatiq = (broker, *actors)
        return self._dramatiq  # type: ignore[no-any-return]

    def publish_dramatiq(self) -> float:
        broker, actor, _ = self.dramatiq()
        run_threads(self.threads, lambda index: actor.send(-1))  # warm: a connection each

        def work(index: int) -> None:
            for n in range(self.per_thread):
                actor.send(n)

        seconds = run_threads(self.threads, work)
        broker.flush(actor.queue_name)
        return seconds

    # consuming -----------------------------------------------------------------------

    def consume_raw(self) -> float:
        self.fill()
        channel = self.connection.channel()
        channel.basic_qos(prefetch_count=200)
        received = 0

        def on_message(ch: Any, method: Any, properties: Any, body: bytes) -> None:
            nonlocal received
            json.loads(body)
            ch.basic_ack(method.delivery_tag)
            received += 1
            if received == self.events:
                ch.stop_consuming()

        channel.basic_consume(self.queue, on_message)
        started = time.perf_counter()
        channel.start_consuming()
        seconds = time.perf_counter() - started
        channel.close()
        return seconds

    def consume_library(self) -> float:
        from domain_event_broker import DomainEvent, Subscriber

        name = f"bench-peers-sub-{uuid.uuid4().hex[:8]}"
        subscriber = Subscriber(URL)
        received = 0

        def handler(event: DomainEvent) -> None:
            nonlocal received
            received += 1
            if received == self.events:
                subscriber.stop_consuming()

        subscriber.register(handler, name, [self.key])
        self.channel.queue_unbind(self.queue, EXCHANGE, routing_key=self.key)
        try:
            self.fill()
            started = time.perf_counter()
            subscriber.start_consuming(timeout=600)
            seconds = time.perf_counter() - started
        finally:
            self.channel.queue_bind(self.queue, EXCHANGE, routing_key=self.key)
            self.channel.queue_delete(name)
            self.channel.exchange_delete(f"{name}-retry")
            subscriber.close()
        assert received == self.events, received
        return seconds

    def consume_kombu(self) -> float:
        from kombu import Connection, Consumer, Exchange, Queue

        self.fill()
        queue = Queue(
            self.queue,
            Exchange(EXCHANGE, type="topic", durable=True),
            routing_key=self.key,
            durable=True,
        )
        received = 0

        def on_message(body: Any, message: Any) -> None:
            nonlocal received
            message.ack()
            received += 1

        with Connection(_kombu_url()) as connection:
            consumer = Consumer(connection, queues=[queue], callbacks=[on_message], accept=["json"])
            consumer.qos(prefetch_count=200)
            with consumer:
                started = time.perf_counter()
                while received < self.events:
                    connection.drain_events(timeout=60)
                seconds = time.perf_counter() - started
        return seconds

    def consume_dramatiq(self) -> float:
        from dramatiq import Worker

        broker, _, actor = self.dramatiq()
        if self._worker is None:
            # Started once and connected (one message handled), then paused.
            self._worker = Worker(broker, worker_threads=1)
            self.handled = 0
            actor.send(-1)
            self._worker.start()
            _wait(lambda: self.handled >= 1)
            self._worker.pause()
        for n in range(self.events):
            actor.send(n)
        self.handled = 0
        started = time.perf_counter()
        self._worker.resume()
        _wait(lambda: self.handled >= self.events)
        seconds = time.perf_counter() - started
        self._worker.pause()
        return seconds


def _wait(done: Callable[[], bool], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError("the dramatiq worker did not finish in time")
        time.sleep(0.002)


def _kombu_url() -> str:
    # kombu names the default virtual host "/" as "//" at the end of the URL.
    return URL.replace("/%2F", "//")


def measure(threads: int, events: int, rounds: int) -> None:
    bench = Bench(threads, events)
    publishers = {
        "raw pika": bench.publish_raw,
        "publish_domain_event": bench.publish_library,
        "kombu": bench.publish_kombu,
        "dramatiq": bench.publish_dramatiq,
    }
    consumers = {
        "raw pika": bench.consume_raw,
        "Subscriber": bench.consume_library,
        "kombu": bench.consume_kombu,
        "dramatiq": bench.consume_dramatiq,
    }
    published = bench.per_thread * threads
    try:
        for title, contenders, count in (
            (f"publish, {threads} threads, confirmed, persistent", publishers, published),
            ("consume, prefilled, one ack each", consumers, events),
        ):
            seconds = dict.fromkeys(contenders, 0.0)
            for _ in range(rounds):
                for name, action in contenders.items():
                    seconds[name] += action()
                    bench.purge()
            raw = count * rounds / seconds["raw pika"]
            print(f"{title} ({count} events x {rounds} rounds):")
            for name in contenders:
                rate = count * rounds / seconds[name]
                print(f"  {name:22} {rate:8.0f} events/s   ratio to raw pika {rate / raw:.2f}")
            sys.stdout.flush()
    finally:
        bench.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--events", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reinstall", action="store_true")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        from importlib import metadata

        versions = ", ".join(
            f"{name} {metadata.version(name)}" for name in ("kombu", "dramatiq", "pika")
        )
        print(f"broker {URL.split('@')[-1]}; {versions}")
        measure(args.threads, args.events, args.rounds)
        return 0
    python = ensure_venv(args.reinstall)
    command = [str(python), __file__, "--measure", "--threads", str(args.threads)]
    command += ["--events", str(args.events), "--rounds", str(args.rounds)]
    return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
