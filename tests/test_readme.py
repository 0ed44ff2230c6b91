"""The README's quick start warns about events published before any handler
registered, shows the opt-in, and sets up logging before a worker runs."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.rst"


def quick_start() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("Quick start\n")
    return text[start : text.index("\nOperators:", start)]


def test_quick_start_warns_that_early_events_are_discarded_and_shows_the_opt_in() -> None:
    section = quick_start()
    assert ".. warning::" in section
    assert "discarded" in section
    assert "require_route=True" in section
    assert "UnroutableError" in section


def test_quick_start_sets_up_logging_before_consuming() -> None:
    section = quick_start()
    assert "logging.basicConfig(" in section
    assert section.index("logging.basicConfig(") < section.index("start_consuming()")
