"""Handler threads: deliveries in, outcomes out, supervised.

A :class:`HandlerThreads` pool runs :func:`dispatch` on each delivery it is
given and posts the outcome to a :class:`Mailbox`, the one way out, which
wakes the I/O thread. Threads never call their owner. If a thread dies
anyway (a bug, or the mailbox failing), the death itself is posted, so the
I/O thread can raise it instead of waiting in silence for outcomes that will
never come.

Before a handler thread starts a *suspect* delivery (one a quorum queue got
back :data:`SUSPECT_COUNT` times or more: its worker died or lost its
connection while holding it), it first has every other delivery it holds
that was returned at least once given back as a fresh copy (see
:mod:`.settle`), and waits until that is done. A crash or a lost connection
while the suspect runs then charges the suspect, not the events that merely
sat in the worker's prefetch beside it: a poison event reaches the queue's
delivery limit, its neighbours never do.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Final

from .._core import headers as _headers
from .._telemetry import otel as _instrument
from .._telemetry.log_fields import event_log_context
from .dispatch import Action, Delivery, Outcome, dispatch

__all__ = ["SUSPECT_COUNT", "Barrier", "HandlerThreads", "Intake", "Mailbox", "ThreadDied"]

log = logging.getLogger(__name__)

_STOP: Final = object()

#: A delivery whose ``x-delivery-count`` (the returns a quorum queue counted
#: towards its delivery limit) is at least this is started alone: see the
#: module docs. Well below the limit (20), above the one or two returns an
#: ordinary restart or connection loss costs.
SUSPECT_COUNT: Final = 3

#: Longest wait (seconds) for the I/O thread to give deliveries back before a
#: suspect starts; past it the suspect starts all the same.
GIVE_BACK_WAIT: Final = 30.0


def returns_counted(delivery: Delivery) -> int:
    """How often a quorum queue counted this delivery's return (0 if unknown)."""
    headers = delivery.properties.headers
    count = headers.get("x-delivery-count") if isinstance(headers, dict) else None
    return count if isinstance(count, int) and not isinstance(count, bool) else 0


class Barrier:
    """Posted to the mailbox after deliveries to give back: the I/O thread
    sets :attr:`done` once it settled what was posted before it, or once it
    knows their channel is gone."""

    def __init__(self) -> None:
        self.done = threading.Event()


class ThreadDied:
    """Posted to the mailbox by a handler thread that is about to die."""

    def __init__(self, thread_name: str, error: BaseException) -> None:
        self.thread_name = thread_name
        self.error = error


class Mailbox:
    """Outcomes posted by handler threads, taken by the I/O thread.

    The I/O thread says how many deliveries it handed over
    (:meth:`expect`) and may wait a moment for their outcomes
    (:meth:`wait_for_outcomes`); otherwise the first outcome posted since its
    last :meth:`take` wakes it.

    Args:
        wake: called (from the posting thread) to have the I/O thread take
            what was posted; must be safe from any thread.
    """

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._lock = threading.Lock()
        self._caught_up = threading.Condition(self._lock)
        self._items: deque[Outcome | ThreadDied | Barrier] = deque()
        #: Deliveries handed over whose outcome is not posted yet.
        self._pending = 0
        #: Whether the I/O thread waits in :meth:`wait_for_outcomes`.
        self._waiting = False

    def expect(self, count: int) -> None:
        """Note ``count`` deliveries handed to handler threads (I/O thread)."""
        with self._lock:
            self._pending += count

    def post(self, item: Outcome | ThreadDied | Barrier) -> None:
        """Add one outcome, a thread's death or a barrier (any thread)."""
        with self._lock:
            first = not self._items
            self._items.append(item)
            if isinstance(item, Outcome):
                self._pending -= 1
            if self._waiting:  # it takes them as soon as it stops waiting
                if self._pending <= 0 or not isinstance(item, Outcome):
                    self._caught_up.notify()
                return
        if first:
            self._wake()

    def wait_for_outcomes(self, timeout: float) -> None:
        """Wait until every delivery handed over has its outcome posted, or a
        thread died, or ``timeout`` seconds passed (I/O thread)."""
        with self._lock:
            if self._pending <= 0:
                return
            self._waiting = True
            try:
                self._caught_up.wait(timeout)
            finally:
                self._waiting = False

    def take(self) -> list[Outcome | ThreadDied | Barrier]:
        """Everything posted so far, oldest first (I/O thread)."""
        with self._lock:
            items = list(self._items)
            self._items.clear()
        return items


class HandlerThreads:
    """``count`` daemon threads running handlers for deliveries submitted.

    With one thread, deliveries are handled one at a time in the order
    submitted. Deliveries for which ``skip`` returns true (their channel is
    gone, or the subscriber is stopping) are not handled: they come out as
    :attr:`Action.SKIP`.

    Args:
        name: thread name prefix.
        count: how many threads.
        mailbox: where outcomes go.
        skip: asked, on the handler thread, before each delivery.
    """

    def __init__(
        self, name: str, count: int, mailbox: Mailbox, skip: Callable[[Delivery], bool]
    ) -> None:
        self._name = name
        self._mailbox = mailbox
        self._skip = skip
        #: Lists of deliveries, each handled in order by one thread.
        self._inbox: queue.SimpleQueue[list[Delivery] | object] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{index}", daemon=True)
            for index in range(count)
        ]
        if count == 1:
            self._threads[0].name = name
        #: When each thread started the handler call it is in.
        self._busy_since: dict[int, float] = {}
        #: A handler raised SystemExit or KeyboardInterrupt: the subscriber
        #: stops, so no further delivery is started (they are returned).
        self._stopping = False

    def start(self) -> None:
        """Start the threads."""
        for thread in self._threads:
            thread.start()

    def submit(self, deliveries: list[Delivery]) -> None:
        """Queue deliveries for the handler threads (any thread), in order.

        One thread takes them all at once, so it is woken once, not once
        per delivery; several threads share them out one by one.
        """
        if len(self._threads) == 1:
            self._inbox.put(deliveries)
        else:
            for delivery in deliveries:
                self._inbox.put([delivery])

    def stop(self, timeout: float | None = None) -> None:
        """Ask every thread to finish after the deliveries queued, and wait.

        Args:
            timeout: longest wait per thread (``None``: as long as it takes);
                a thread stuck in a handler after that is left behind (it is
                a daemon and does not keep the process alive).
        """
        for _ in self._threads:
            self._inbox.put(_STOP)
        for thread in self._threads:
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(timeout)

    def _run(self) -> None:
        name = threading.current_thread().name
        #: Deliveries (and stop marks) taken from the inbox, in order.
        held: deque[Delivery | object] = deque()
        try:
            while True:
                if not held:
                    held.append(self._inbox.get())
                item = held.popleft()
                if item is _STOP:
                    return
                if isinstance(item, list):
                    held.extendleft(reversed(item))
                    continue
                assert isinstance(item, Delivery)
                if returns_counted(item) >= SUSPECT_COUNT:
                    self._give_back_others(item, held)
                self._mailbox.post(self._handle(item))
        except BaseException as exc:  # report any death, never die in silence
            log.critical("Handler thread %s died: %r", name, exc, exc_info=True)
            try:
                self._mailbox.post(ThreadDied(name, exc))
            except BaseException:  # noqa: BLE001  # nothing left to tell; the owner polls is_alive
                log.critical("Handler thread %s could not report its death", name)

    def _give_back_others(self, suspect: Delivery, held: deque[Delivery | object]) -> None:
        """Have the I/O thread give back, as fresh copies, the deliveries of
        the suspect's channel this thread holds that were returned before,
        and wait until it did (see the module docs). Again for those that
        arrived meanwhile, until none is left to give back."""
        while not (self._stopping or self._skip(suspect)):
            given_back = self._post_give_backs(suspect, held)
            if not given_back:
                return
            barrier = Barrier()
            self._mailbox.post(barrier)
            if not barrier.done.wait(GIVE_BACK_WAIT):
                log.warning(
                    "Handler %s: %d event(s) held beside one delivered %d times were not "
                    "given back within %gs; starting it all the same",
                    suspect.registration.name,
                    given_back,
                    returns_counted(suspect) + 1,
                    GIVE_BACK_WAIT,
                )
                return

    def _post_give_backs(self, suspect: Delivery, held: deque[Delivery | object]) -> int:
        """Post SKIP for each held delivery of the suspect's channel returned
        before; returns how many."""
        while True:  # everything queued for this thread so far, in order
            try:
                held.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        kept: list[Delivery | object] = []
        given_back = 0
        for item in _flatten(held):
            if (
                isinstance(item, Delivery)
                and item.generation == suspect.generation
                and returns_counted(item) >= 1
            ):
                self._mailbox.post(Outcome(item, Action.SKIP))
                given_back += 1
            else:
                kept.append(item)
        held.clear()
        held.extend(kept)
        return given_back

    def _handle(self, delivery: Delivery) -> Outcome:
        if self._stopping or self._skip(delivery):
            return Outcome(delivery, Action.SKIP)
        ident = threading.get_ident()
        self._busy_since[ident] = time.monotonic()
        try:
            outcome = traced_dispatch(delivery)
        finally:
            self._busy_since.pop(ident, None)
        if outcome.action is Action.STOP:
            # Set here, before the next delivery of this batch, not when the
            # I/O thread reads the outcome: a handler that asked the process
            # to exit must not be handed another event first.
            self._stopping = True
        return outcome

    def busy_for(self) -> float:
        """How long (seconds) the longest-running handler call has run; 0 when idle."""
        started = list(self._busy_since.values())
        return time.monotonic() - min(started) if started else 0.0

    def alive(self) -> bool:
        """Whether every thread is still running."""
        return all(thread.is_alive() for thread in self._threads)


def _flatten(items: deque[Delivery | object]) -> list[Delivery | object]:
    flat: list[Delivery | object] = []
    for item in items:
        if isinstance(item, list):
            flat.extend(item)
        else:
            flat.append(item)
    return flat


class Intake:
    """Deliveries read in one turn of the I/O loop, handed to their pools
    together when it ends (I/O thread only).

    A handler thread is then woken once for all a read brought, not once per
    delivery; each pool gets its deliveries in the order they came.
    """

    def __init__(self, mailbox: Mailbox) -> None:
        self._mailbox = mailbox
        self._arrived: dict[HandlerThreads, list[Delivery]] = {}

    def add(self, pool: HandlerThreads, delivery: Delivery) -> None:
        """Note a delivery for ``pool``."""
        self._arrived.setdefault(pool, []).append(delivery)

    def hand_over(self) -> int:
        """Submit what was noted to its pools, and tell the mailbox to expect
        their outcomes; returns how many deliveries were handed over."""
        arrived, self._arrived = self._arrived, {}
        count = sum(len(deliveries) for deliveries in arrived.values())
        if count:
            self._mailbox.expect(count)
            for pool, deliveries in arrived.items():
                pool.submit(deliveries)
        return count


_MALFORMED: Final = "domain_event_broker.errors.MalformedEventError"


def traced_dispatch(delivery: Delivery) -> Outcome:
    """:func:`dispatch`, inside a process span and the event's log fields.

    Tracing never stands in the way: if the instrumentation fails, the
    delivery is dispatched all the same (exactly once).
    """
    name = delivery.registration.name
    properties = delivery.properties
    try:
        scope = _instrument.process_span(
            name,
            None,
            delivery.routing_key,
            properties.headers,
            message_id=properties.message_id,
        )
        scope.__enter__()
    except Exception:  # a tracing failure must not cost the event
        log.warning("Could not start a trace span for %s", name, exc_info=True)
        return dispatch(delivery)
    outcome: Outcome | None = None
    try:
        with event_log_context(
            None, routing_key=delivery.routing_key, handler=name, event_uuid=properties.message_id
        ):
            outcome = dispatch(delivery)
        _record_outcome(scope, outcome)
    finally:
        try:
            scope.__exit__(None, None, None)
        except Exception:  # see above
            log.warning("Could not end a trace span for %s", name, exc_info=True)
    return outcome


def _record_outcome(scope: _instrument.ProcessHook, outcome: Outcome) -> None:
    try:
        exception_type = outcome.headers.get(_headers.EXCEPTION_TYPE)
        if outcome.action is Action.ACK:
            scope.set_outcome("handled")
        elif outcome.action is Action.RETRY:
            scope.set_outcome("retry", delay_ms=outcome.delay_ms)
        elif exception_type == _MALFORMED:
            scope.set_outcome("malformed", exception_type=exception_type)
        elif outcome.action is Action.DEAD_LETTER:
            scope.set_outcome("dead_letter", exception_type=exception_type)
        elif outcome.action is Action.DISCARD:
            scope.set_outcome("discarded", exception_type=exception_type)
        else:
            scope.set_outcome("requeued")
    except Exception:  # a tracing failure must not cost the event
        log.warning("Could not record an outcome in its trace span", exc_info=True)
