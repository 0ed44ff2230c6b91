"""The app config: the DOMAIN_EVENT_BROKER setting."""

from __future__ import annotations

import pytest
from django.apps import apps
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from domain_event_broker._amqp import config as _config


def _ready() -> None:
    apps.get_app_config("domain_event_broker_django").ready()


def test_app_keeps_3_0_2_label_and_path() -> None:
    config = apps.get_app_config("domain_event_broker_django")
    assert config.name == "domain_event_broker.django"


@pytest.mark.parametrize(
    ("setting", "urls"),
    [
        ("amqp://u:p@broker-a:5672/%2F", ("amqp://u:p@broker-a:5672/%2F",)),
        (["amqp://a:5672/%2F", "amqp://b:5672/%2F"], ("amqp://a:5672/%2F", "amqp://b:5672/%2F")),
    ],
)
def test_setting_becomes_the_default_broker(
    setting: object, urls: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DOMAIN_EVENT_BROKER", raising=False)
    with override_settings(DOMAIN_EVENT_BROKER=setting):
        _ready()
    config = _config.resolve()
    assert config is not None
    assert config.urls == urls


def test_none_disables_the_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DOMAIN_EVENT_BROKER", raising=False)
    with override_settings(DOMAIN_EVENT_BROKER=None):
        _ready()
    assert _config.resolve() is None


def test_environment_variable_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOMAIN_EVENT_BROKER", "amqp://from-env:5672/%2F")
    with override_settings(DOMAIN_EVENT_BROKER=None):
        _ready()
    config = _config.resolve()
    assert config is not None
    assert config.urls == ("amqp://from-env:5672/%2F",)


@pytest.mark.parametrize("setting", ["", "   "])
def test_blank_setting_means_default(setting: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DOMAIN_EVENT_BROKER", raising=False)
    with override_settings(DOMAIN_EVENT_BROKER=setting):
        _ready()
    config = _config.resolve()
    assert config is not None
    assert config.urls == (_config.DEFAULT_URL,)


@pytest.mark.parametrize("setting", ["http://not-amqp", 42, ["amqp://ok:5672/", 7]])
def test_bad_setting_is_improperly_configured(setting: object) -> None:
    with (
        override_settings(DOMAIN_EVENT_BROKER=setting),
        pytest.raises(ImproperlyConfigured, match="DOMAIN_EVENT_BROKER"),
    ):
        _ready()


def test_outbox_names_are_importable_from_the_package() -> None:
    import domain_event_broker.django as integration
    from domain_event_broker.django.outbox import publish_via_outbox
    from domain_event_broker.django.relay import OutboxRelay

    assert integration.publish_via_outbox is publish_via_outbox
    assert integration.OutboxRelay is OutboxRelay
    with pytest.raises(AttributeError):
        integration.no_such_name  # noqa: B018


def test_core_package_does_not_import_django() -> None:
    import subprocess
    import sys

    code = "import sys, domain_event_broker; sys.exit('django' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_queue_type_setting_becomes_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_config.QUEUE_TYPE_VARIABLE, raising=False)
    with override_settings(DOMAIN_EVENT_BROKER_QUEUE_TYPE="quorum"):
        _ready()
    assert _config.default_queue_type() == "quorum"
    monkeypatch.setenv(_config.QUEUE_TYPE_VARIABLE, "classic")
    assert _config.default_queue_type() == "classic"


def test_unknown_queue_type_setting_is_improperly_configured() -> None:
    with (
        override_settings(DOMAIN_EVENT_BROKER_QUEUE_TYPE="mirrored"),
        pytest.raises(ImproperlyConfigured, match="DOMAIN_EVENT_BROKER_QUEUE_TYPE"),
    ):
        _ready()
