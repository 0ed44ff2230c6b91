"""The public surface is exactly ``domain_event_broker.__all__`` (httpx-style)."""

from __future__ import annotations

import importlib.util
import re
import types
from pathlib import Path

import pytest

import domain_event_broker
from domain_event_broker import DomainEventBrokerError

#: Names of domain-event-broker 3.0.2's ``__init__``, with the module that
#: provides them here (names whose module has not landed yet are skipped).
NAMES_302 = {
    "publish_domain_event": "publish",
    "Publisher": "publish",
    "DomainEvent": "events",
    "Subscriber": "subscribe",
    "Retry": "subscribe",
    "replay_event": "replay",
    "replay_all": "replay",
    "RETRY": "replay",
    "DISCARD": "replay",
    "LEAVE": "replay",
}


def public_members(module: types.ModuleType) -> list[str]:
    """Non-underscore names bound in ``module``, submodules left out."""
    return [
        name
        for name in dir(module)  # names imported on first use included
        if not name.startswith("_") and not isinstance(getattr(module, name), types.ModuleType)
    ]


def test_all_public_members_are_exported() -> None:
    exported = set(domain_event_broker.__all__)
    assert set(public_members(domain_event_broker)) - exported == set()
    assert exported - {"__version__"} == set(public_members(domain_event_broker))


def test_all_has_no_duplicates_and_every_name_resolves() -> None:
    assert len(domain_event_broker.__all__) == len(set(domain_event_broker.__all__))
    for name in domain_event_broker.__all__:
        assert hasattr(domain_event_broker, name), name


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from domain_event_broker import *", namespace)
    namespace.pop("__builtins__")
    assert set(namespace) == set(domain_event_broker.__all__)


@pytest.mark.parametrize("name", sorted(NAMES_302))
def test_names_of_302_are_kept(name: str) -> None:
    module = NAMES_302[name]
    if importlib.util.find_spec(f"domain_event_broker.{module}") is None:
        pytest.skip(f"domain_event_broker.{module} has not landed yet")
    assert name in domain_event_broker.__all__
    assert hasattr(domain_event_broker, name)


def test_transport_module_of_302_still_imports() -> None:
    from domain_event_broker import transport

    assert transport.Publisher is domain_event_broker.Publisher
    assert transport.publish_domain_event is domain_event_broker.publish_domain_event


def test_every_exported_exception_derives_from_the_root() -> None:
    errors = [
        value
        for value in (getattr(domain_event_broker, name) for name in domain_event_broker.__all__)
        if isinstance(value, type) and issubclass(value, BaseException)
    ]
    assert DomainEventBrokerError in errors
    for error in errors:
        if error is domain_event_broker.Retry:
            continue  # raised by handlers to ask for a retry: a signal, not an error
        assert issubclass(error, DomainEventBrokerError), error


def test_version_is_a_string() -> None:
    assert isinstance(domain_event_broker.__version__, str)
    assert domain_event_broker.__version__


def test_every_public_name_is_in_the_api_reference() -> None:
    api = Path(__file__).resolve().parent.parent / "docs" / "api.rst"
    text = api.read_text(encoding="utf-8")
    missing = [
        name
        for name in domain_event_broker.__all__
        if name != "__version__"
        and not re.search(rf"^\.\. auto\w+:: {re.escape(name)}$|^\.\. data:: {name}$", text, re.M)
    ]
    assert missing == [], f"add these to {api.name}"


def test_the_package_docstring_and_the_api_reference_name_the_same_public_modules() -> None:
    api = Path(__file__).resolve().parent.parent / "docs" / "api.rst"
    intro = api.read_text(encoding="utf-8").split(".. currentmodule::")[0]
    listed = set(re.findall(r"``(?:domain_event_broker)?\.(\w+)``", intro))
    named = set(
        re.findall(r"``(\w+)``", (domain_event_broker.__doc__ or "").split("public as well:")[1])
    )
    public = {
        path.stem if path.suffix == ".py" else path.name
        for path in Path(domain_event_broker.__file__).parent.iterdir()
        if not path.name.startswith("_")
        and (path.suffix == ".py" or (path / "__init__.py").exists())
    } - {"pytest_plugin"}  # loaded by pytest, not imported by users
    assert listed == public
    assert named - {"main", "domain-event-broker"} == public
