"""A child forked while another thread makes a first use of the package never hangs.

Some imports are deferred to first use (the dead-letter tools, the
OpenTelemetry hooks, the consuming machinery). A fork in the middle of one,
made by another thread, must not hand the child that import's lock half-held.
"""

from __future__ import annotations

import subprocess
import sys

#: Fresh interpreters to try: without the fix about a quarter of them hung,
#: so all of them passing by chance is below one in a hundred.
RUNS = 16

SCRIPT = """
import os, random, sys, threading, time
import domain_event_broker

def first_use():
    from domain_event_broker import replay_all  # the dead-letter tools
    from domain_event_broker._telemetry import otel
    otel.trace_headers()  # the OpenTelemetry hooks

threading.Thread(target=first_use).start()
time.sleep(random.uniform(0, 0.03))
pid = os.fork()
if pid == 0:
    first_use()
    os._exit(0)
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        sys.exit(os.waitstatus_to_exitcode(status))
    time.sleep(0.01)
os.kill(pid, 9)
print("the child hung")
sys.exit(3)
"""


def test_a_fork_during_a_first_use_does_not_hang_the_child() -> None:
    outcomes = []
    for _ in range(RUNS):
        result = subprocess.run(
            [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=False
        )
        outcomes.append((result.returncode, result.stdout.strip(), result.stderr[-300:]))
    assert [outcome for outcome in outcomes if outcome[0] != 0] == []
