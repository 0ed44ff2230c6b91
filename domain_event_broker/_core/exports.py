"""Public faces naming what they export as their own."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = ["claim"]


def claim(module: str, namespace: Mapping[str, object], names: Iterable[str]) -> None:
    """Give the classes and functions ``names`` of a public face ``module``
    that the private package defines that module's name: their documented
    home, as reprs, pickles and the API docs show it."""
    for name in names:
        value = namespace[name]
        if getattr(value, "__module__", "").startswith("domain_event_broker._"):
            value.__module__ = module
