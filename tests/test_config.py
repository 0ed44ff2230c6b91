"""Connection settings: resolution order, URL checks, redaction (no broker)."""

from __future__ import annotations

import pickle

import pytest

from domain_event_broker import (
    UNSET,
    ConfigurationError,
    DomainEventBrokerError,
    configure,
    reset_defaults,
)
from domain_event_broker._amqp.config import (
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    ENVIRONMENT_VARIABLE,
    redact,
    resolve,
)

ARGUMENT = "amqp://arg:arg-pw@argument-host:5672/%2F"
ENVIRONMENT = "amqp://env:env-pw@environment-host:5672/%2F"
CONFIGURED = "amqp://conf:conf-pw@configured-host:5672/%2F"


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)


def urls(settings: object = UNSET) -> tuple[str, ...] | None:
    config = resolve(settings)  # type: ignore[arg-type]
    return None if config is None else config.urls


# -- the sentinel ---------------------------------------------------------------


def test_unset_is_a_falsy_singleton_distinct_from_none() -> None:
    assert UNSET is not None
    assert not UNSET
    assert repr(UNSET) == "UNSET"
    assert type(UNSET)() is UNSET


# -- resolution order: argument > environment > configure() > default ------------


def test_default_url_when_nothing_is_set() -> None:
    assert urls() == (DEFAULT_URL,)
    assert DEFAULT_URL == "amqp://guest:guest@localhost:5672/%2F"


def test_configure_beats_the_default() -> None:
    configure(broker=CONFIGURED)
    assert urls() == (CONFIGURED,)


def test_environment_beats_configure(monkeypatch: pytest.MonkeyPatch) -> None:
    configure(broker=CONFIGURED)
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, ENVIRONMENT)
    assert urls() == (ENVIRONMENT,)


def test_argument_beats_environment_and_configure(monkeypatch: pytest.MonkeyPatch) -> None:
    configure(broker=CONFIGURED)
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, ENVIRONMENT)
    assert urls(ARGUMENT) == (ARGUMENT,)


def test_none_argument_disables_the_broker_whatever_else_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    configure(broker=CONFIGURED)
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, ENVIRONMENT)
    assert resolve(None) is None


def test_configure_none_disables_the_broker_unless_the_environment_names_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    configure(broker=None)
    assert resolve() is None
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, ENVIRONMENT)
    assert urls() == (ENVIRONMENT,)


@pytest.mark.parametrize("empty", ["", "   "])
def test_empty_argument_means_the_default_as_in_302(
    empty: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert urls(empty) == (DEFAULT_URL,)
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, ENVIRONMENT)
    assert urls(empty) == (ENVIRONMENT,)


@pytest.mark.parametrize("empty", ["", "  "])
def test_empty_environment_variable_is_ignored(empty: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, empty)
    configure(broker=CONFIGURED)
    assert urls() == (CONFIGURED,)


def test_explicit_unset_argument_means_the_default() -> None:
    configure(broker=CONFIGURED)
    assert urls(UNSET) == (CONFIGURED,)


@pytest.mark.parametrize("empty", ["", " "])
def test_configure_empty_string_restores_the_default_broker(empty: str) -> None:
    configure(broker=CONFIGURED)
    configure(broker=empty)
    assert urls() == (DEFAULT_URL,)


def test_reset_defaults_undoes_configure() -> None:
    configure(broker=CONFIGURED, timeout=3)
    reset_defaults()
    config = resolve()
    assert config is not None
    assert config.urls == (DEFAULT_URL,)
    assert config.timeout == DEFAULT_TIMEOUT == 30.0


def test_configure_leaves_what_it_is_not_given() -> None:
    configure(broker=CONFIGURED)
    configure(timeout=5)
    config = resolve()
    assert config is not None
    assert config.urls == (CONFIGURED,)
    assert config.timeout == 5.0


# -- several URLs -------------------------------------------------------------------


def test_list_of_urls_keeps_its_order() -> None:
    assert urls([ENVIRONMENT, ARGUMENT]) == (ENVIRONMENT, ARGUMENT)
    assert urls((ARGUMENT, ENVIRONMENT)) == (ARGUMENT, ENVIRONMENT)


def test_comma_or_space_separated_urls_in_one_string(monkeypatch: pytest.MonkeyPatch) -> None:
    assert urls(f"{ARGUMENT}, {ENVIRONMENT}") == (ARGUMENT, ENVIRONMENT)
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, f"{ENVIRONMENT} {ARGUMENT}")
    assert urls() == (ENVIRONMENT, ARGUMENT)


# -- malformed settings ----------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        "http://guest:guest@localhost/",
        "localhost:5672",
        "amqp://guest:guest@localhost:notaport/",
        "amqp://guest:guest@localhost:99999/",
        "amqp://guest:guest@:5672/",
        "amqp://guest:guest@[::1/",
        "amqp://guest:guest@localhost/?heartbeat=often",
        [],
        ["amqp://localhost/", 5],
        ["amqp://localhost/", ""],
        42,
        b"amqp://localhost/",
    ],
)
def test_malformed_settings_raise_configuration_error(settings: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        resolve(settings)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, DomainEventBrokerError)


def test_configure_validates_its_url_at_once() -> None:
    with pytest.raises(ConfigurationError):
        configure(broker="http://nope/")
    assert urls() == (DEFAULT_URL,)


@pytest.mark.parametrize("timeout", [0, -1, "10", True, float("nan"), None])
def test_configure_rejects_a_bad_timeout(timeout: object) -> None:
    with pytest.raises(ConfigurationError):
        configure(timeout=timeout)  # type: ignore[arg-type]


def test_resolve_rejects_a_bad_timeout() -> None:
    with pytest.raises(ConfigurationError):
        resolve(ARGUMENT, timeout=-5)


# -- passwords stay secret ---------------------------------------------------------------

SECRET = "Sup3rSecretPw"


@pytest.mark.parametrize(
    "url",
    [
        f"amqp://user:{SECRET}@localhost:notaport/",
        f"http://user:{SECRET}@localhost/",
        f"amqp://user:{SECRET}/x@localhost/",
        f"amqp://user:x/{SECRET}@localhost/",
        f"amqp://user:{SECRET}#x@localhost/",
        f"amqp://user:{SECRET}?x@localhost/",
        f"amqp://user:{SECRET}@localhost/?heartbeat=often",
        f"amqp://user:{SECRET}@localhost/?no_such_option=1",
        f"amqp://user:{SECRET}@[::1/",
    ],
)
def test_malformed_url_errors_never_show_the_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        resolve(url)
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value)
    # The lower-level error (whose text may hold the password) is not chained.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_password_with_percent_encoded_specials_is_accepted() -> None:
    assert urls("amqp://user:pa%2Fss%40word@localhost/") is not None


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"amqp://user:{SECRET}@host:5672/%2F", "amqp://user:***@host:5672/%2F"),
        (f"amqps://user:{SECRET}@host/", "amqps://user:***@host/"),
        (f"amqp://user:{SECRET}/x@host/", "amqp://user:***@host/"),
        (f"amqp://:{SECRET}@host/", "amqp://:***@host/"),
        ("amqp://user@host/", "amqp://user@host/"),
        ("amqp://host/", "amqp://host/"),
        ("not a url", "not a url"),
    ],
)
def test_redact(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_resolved_config_never_shows_the_password() -> None:
    config = resolve([f"amqp://u:{SECRET}@a/", f"amqp://u:{SECRET}@b/"])
    assert config is not None
    assert SECRET not in repr(config)
    assert SECRET not in config.display
    assert "amqp://u:***@a/" in config.display


# -- pika parameters ---------------------------------------------------------------------


def test_parameters_bound_every_wait() -> None:
    config = resolve(ARGUMENT, timeout=7)
    assert config is not None
    (params,) = config.parameters("my connection", time_left=3.0)
    assert params.host == "argument-host"
    assert params.connection_attempts == 1
    assert params.socket_timeout == 3.0
    assert params.stack_timeout == 3.0
    assert params.blocked_connection_timeout == 7.0
    assert params.heartbeat == 60  # also when the broker proposes 0 (off)
    assert params.client_properties == {"connection_name": "my connection"}


def test_parameters_keep_options_the_url_sets_itself() -> None:
    config = resolve(ARGUMENT + "?socket_timeout=1.5&blocked_connection_timeout=2&heartbeat=5")
    assert config is not None
    (params,) = config.parameters("name", time_left=30.0)
    assert params.socket_timeout == 1.5
    assert params.blocked_connection_timeout == 2.0
    assert params.heartbeat == 5


def test_parameters_per_url_in_order() -> None:
    config = resolve(["amqp://a/", "amqp://b:5673/"])
    assert config is not None
    hosts = [(p.host, p.port) for p in config.parameters("name", time_left=5.0)]
    assert hosts == [("a", 5672), ("b", 5673)]


def test_amqps_url_gets_tls_parameters() -> None:
    config = resolve("amqps://user:pw@broker.example:5671/%2F")
    assert config is not None
    (params,) = config.parameters("name", time_left=5.0)
    assert params.ssl_options is not None
    assert params.port == 5671


def test_broker_config_is_hashable_and_picklable() -> None:
    config = resolve(ARGUMENT)
    assert config is not None
    assert hash(config) == hash(resolve(ARGUMENT))
    assert pickle.loads(pickle.dumps(config)) == config


@pytest.mark.parametrize(
    ("urls", "expected"),
    [
        (["amqp://localhost/%2F"], 60.0),
        (["amqp://localhost/%2F?heartbeat=5"], 5.0),
        (["amqp://a/%2F?heartbeat=10", "amqp://b/%2F"], 10.0),
        (["amqp://localhost/%2F?heartbeat=0"], None),
    ],
)
def test_heartbeat_asked_for(urls: list[str], expected: float | None) -> None:
    config = resolve(urls)
    assert config is not None
    assert config.heartbeat == expected
