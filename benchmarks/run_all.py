"""Run every ``benchmarks/bench_*.py``, one after the other, in subprocesses.

Arguments are passed on to each benchmark (they all accept ``--help``).
Exits non-zero if any benchmark failed. ``bench_peers.py`` is left out: it
installs kombu and dramatiq into ``build/peers-venv``; run it on its own.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

#: Benchmarks that run only when called by name.
ON_THEIR_OWN = {"bench_peers.py"}


def main(argv: list[str]) -> int:
    here = Path(__file__).resolve().parent
    failed = []
    for script in sorted(here.glob("bench_*.py")):
        if script.name in ON_THEIR_OWN:
            continue
        print(f"== {script.name}", flush=True)
        if subprocess.run([sys.executable, str(script), *argv], check=False).returncode:
            failed.append(script.name)
        print(flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
