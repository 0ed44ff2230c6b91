"""Import time: ``import domain_event_broker`` against ``import pika``, in one run.

Each round starts two fresh interpreters, one per import, in alternating
order, and reads the cumulative time of the top-level import from
``python -X importtime``. Prints the medians and their ratio (the target is
at most 1.25), and the modules of the package that cost the most.

    python benchmarks/bench_import.py [--rounds 21]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

#: Both imports read bytecode compiled beforehand (as from an installed
#: wheel), from a cache of this run's own: the Makefile turns bytecode
#: writing off, which would otherwise compile the package at every import.
_ENVIRONMENT = {
    **os.environ,
    "PYTHONPYCACHEPREFIX": tempfile.mkdtemp(prefix="bench-import-"),
}
_ENVIRONMENT.pop("PYTHONDONTWRITEBYTECODE", None)


def import_time(module: str) -> tuple[int, dict[str, int]]:
    """Microseconds to import ``module`` (cumulative), and each module's own time."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        capture_output=True,
        text=True,
        check=True,
        env=_ENVIRONMENT,
    )
    own: dict[str, int] = {}
    total = 0
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative, name = (part.strip() for part in line[12:].split("|"))
        own[name] = int(self_us)
        if name == module:
            total = int(cumulative)
    return total, own


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args()
    pika_times: list[int] = []
    ours: list[int] = []
    costs: dict[str, list[int]] = {}
    import_time("domain_event_broker")  # compiles both into the cache
    for round_ in range(args.rounds):
        order = ["pika", "domain_event_broker"]
        if round_ % 2:
            order.reverse()
        for module in order:
            total, own = import_time(module)
            (pika_times if module == "pika" else ours).append(total)
            if module == "domain_event_broker":
                for name, value in own.items():
                    costs.setdefault(name, []).append(value)
    pika_ms = statistics.median(pika_times) / 1000
    ours_ms = statistics.median(ours) / 1000
    print(f"import pika                 median {pika_ms:7.1f} ms over {args.rounds} rounds")
    print(f"import domain_event_broker  median {ours_ms:7.1f} ms (pika included)")
    print(f"ratio                       {ours_ms / pika_ms:.2f} (target <= 1.25)")
    own_package = {
        name: statistics.median(values)
        for name, values in costs.items()
        if name.startswith("domain_event_broker")
    }
    print("the package's own modules, median self time:")
    for name, value in sorted(own_package.items(), key=lambda item: -item[1])[:8]:
        print(f"  {value / 1000:6.2f} ms  {name}")
    others = {
        name: statistics.median(values)
        for name, values in costs.items()
        if not name.startswith(("domain_event_broker", "pika"))
    }
    print("other modules it loads (not pika's), median self time, largest:")
    for name, value in sorted(others.items(), key=lambda item: -item[1])[:8]:
        print(f"  {value / 1000:6.2f} ms  {name}")


if __name__ == "__main__":
    main()
