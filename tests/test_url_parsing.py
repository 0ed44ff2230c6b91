"""AMQP URLs: what pika reads, or a clear refusal naming the part (issue 23,
items 11 and 24): a comma in a password, a user without a password, an
unencoded '@'. No broker needed."""

from __future__ import annotations

from urllib.parse import quote

import pika
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from domain_event_broker import ConfigurationError
from domain_event_broker._amqp.config import ENVIRONMENT_VARIABLE, resolve, split_urls

#: Words naming the part of a URL that a refusal must contain (one of them).
PARTS = ("scheme", "user name", "password", "host", "port", "virtual host", "amqp://")


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)


def parameters(url: str) -> pika.URLParameters:
    config = resolve([url])
    assert config is not None
    (params,) = config.parameters("test", 5)
    return params


def same_as_pika(url: str) -> None:
    ours, theirs = parameters(url), pika.URLParameters(url)
    assert (ours.host, ours.port, ours.virtual_host) == (
        theirs.host,
        theirs.port,
        theirs.virtual_host,
    )
    assert isinstance(ours.credentials, pika.PlainCredentials)
    assert isinstance(theirs.credentials, pika.PlainCredentials)
    assert (ours.credentials.username, ours.credentials.password) == (
        theirs.credentials.username,
        theirs.credentials.password,
    )


def test_a_comma_in_the_password_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "amqp://app:pa,ss@rabbit:5672/%2F"
    same_as_pika(url)
    assert parameters(url).credentials.password == "pa,ss"
    # Also in the one-string forms: the argument, the environment, the broker file.
    for text in (url, f"{url},", f" {url} "):
        config = resolve(text)
        assert config is not None and config.urls == (url,)
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, f"{url},amqp://app:x,y@rabbit-2/%2F")
    config = resolve()
    assert config is not None
    assert config.urls == (url, "amqp://app:x,y@rabbit-2/%2F")


@pytest.mark.parametrize(
    ("text", "urls"),
    [
        ("amqp://a/%2F,amqp://b/%2F", ("amqp://a/%2F", "amqp://b/%2F")),
        ("amqp://a/%2F, amqp://b/%2F", ("amqp://a/%2F", "amqp://b/%2F")),
        ("amqp://a/%2F ,amqps://b/%2F,", ("amqp://a/%2F", "amqps://b/%2F")),
        ("amqp://a/%2F\namqp://b/%2F", ("amqp://a/%2F", "amqp://b/%2F")),
        ("amqp://u:p,q@a/%2F,AMQP://b", ("amqp://u:p,q@a/%2F", "AMQP://b")),
        ("amqp://a,amqp:/b", ("amqp://a", "amqp:/b")),  # the second is refused later
        ("amqp://a/%2F,amqp//b", ("amqp://a/%2F", "amqp//b")),
    ],
)
def test_separating_commas(text: str, urls: tuple[str, ...]) -> None:
    assert split_urls(text) == urls


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("amqp://app@rabbit/%2F", "the user name 'app' has no password"),
        ("amqp://@rabbit/%2F", "has no password"),
        ("amqp://app:pa@ss@rabbit", "an '@' in the user name or password"),
        ("amqp://u:p@rabbit-1,u:p@rabbit-2", "several nodes"),
        ("amqp://rabbit-1,rabbit-2/%2F", "a ',' in the host name"),
        ("amqp://rabbit:5672,5673/%2F", "a ',' in the host name or port"),
        ("amqp://user:pa/ss@rabbit/%2F", "must be percent-encoded"),
    ],
)
def test_refused_with_the_part_named(url: str, said: str) -> None:
    with pytest.raises(ConfigurationError, match="malformed AMQP URL") as info:
        resolve(url)
    assert said in str(info.value)
    assert "ss@" not in str(info.value)  # no password shown


def test_an_empty_password_is_legal() -> None:
    same_as_pika("amqp://app:@rabbit/%2F")
    assert parameters("amqp://app:@rabbit/%2F").credentials.password == ""


# Characters that mean something in a URL, or to the library's splitting.
specials = st.sampled_from([*"@:/?#%,; []", "%2C", "%40", "%2F", "%3A", "é"])
piece = st.lists(st.sampled_from(list("aZ09-_.~")) | specials, max_size=6).map("".join)


@settings(deadline=None)  # amqps:// URLs build TLS contexts: slow on a loaded machine
@given(
    user=st.none() | piece,
    password=st.none() | piece,
    host=piece,
    port=st.none() | st.integers(-1, 70000).map(str) | piece,
    vhost=st.none() | piece,
    encode=st.booleans(),
    scheme=st.sampled_from(["amqp", "amqps"]),
)
@example(
    user="app", password=None, host="rabbit", port=None, vhost="%2F", encode=False, scheme="amqp"
)
@example(
    user="app", password="pa@ss", host="rabbit", port=None, vhost=None, encode=False, scheme="amqp"
)
@example(
    user="app",
    password="pa,ss",
    host="rabbit",
    port="5672",
    vhost="%2F",
    encode=False,
    scheme="amqp",
)
def test_every_url_parses_as_pika_does_or_is_refused_naming_the_part(
    user: str | None,
    password: str | None,
    host: str,
    port: str | None,
    vhost: str | None,
    encode: bool,
    scheme: str,
) -> None:
    def part(text: str) -> str:
        return quote(text, safe="") if encode else text

    userinfo = ""
    if user is not None:
        userinfo = part(user) + ("" if password is None else ":" + part(password)) + "@"
    url = f"{scheme}://{userinfo}{host}"
    url += "" if port is None else f":{port}"
    url += "" if vhost is None else "/" + part(vhost)
    try:
        same_as_pika(url)
    except ConfigurationError as exc:
        assert isinstance(exc, ValueError)
        message = str(exc)
        assert message.startswith("malformed AMQP URL")
        assert any(word in message for word in PARTS), message
        if password:
            assert f":{part(password)}@" not in message


@pytest.mark.parametrize("host", ["a" * 64 + ".example", "a" * 300, "x..y"])
def test_a_host_name_dns_cannot_hold_is_a_configuration_error(host: str) -> None:
    """Found by the attack: a label longer than 63 characters ended in a
    bare UnicodeError from the idna codec, when connecting."""
    with pytest.raises(ConfigurationError, match="not a valid DNS name"):
        resolve(f"amqp://guest:guest@{host}:5672/%2F")
