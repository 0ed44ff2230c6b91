"""The DOMAIN_EVENT_BROKER_FILE Django setting: the URL(s) from a file."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.apps import apps
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from domain_event_broker._amqp import config as _config


def _ready() -> None:
    apps.get_app_config("domain_event_broker_django").ready()


def test_file_setting_becomes_the_default_broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DOMAIN_EVENT_BROKER", raising=False)
    secret = tmp_path / "broker"
    secret.write_text("amqps://app:s3cret@rabbit-1/%2F\namqps://app:s3cret@rabbit-2/%2F\n")
    with override_settings(DOMAIN_EVENT_BROKER=None, DOMAIN_EVENT_BROKER_FILE=str(secret)):
        _ready()
    config = _config.resolve()
    assert config is not None
    assert config.urls == ("amqps://app:s3cret@rabbit-1/%2F", "amqps://app:s3cret@rabbit-2/%2F")


def test_unreadable_file_is_improperly_configured(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with (
        override_settings(DOMAIN_EVENT_BROKER=None, DOMAIN_EVENT_BROKER_FILE=str(missing)),
        pytest.raises(ImproperlyConfigured, match=r"settings\.DOMAIN_EVENT_BROKER_FILE names"),
    ):
        _ready()


def test_malformed_url_in_the_file_hides_the_password(tmp_path: Path) -> None:
    secret = tmp_path / "broker"
    secret.write_text("amqp://app:hunter2-pw@rabbit:notaport/%2F")
    with (
        override_settings(DOMAIN_EVENT_BROKER=None, DOMAIN_EVENT_BROKER_FILE=str(secret)),
        pytest.raises(ImproperlyConfigured) as caught,
    ):
        _ready()
    assert "hunter2-pw" not in str(caught.value)


def test_both_settings_are_an_error(tmp_path: Path) -> None:
    secret = tmp_path / "broker"
    secret.write_text("amqp://rabbit/%2F")
    with (
        override_settings(
            DOMAIN_EVENT_BROKER="amqp://other/%2F", DOMAIN_EVENT_BROKER_FILE=str(secret)
        ),
        pytest.raises(ImproperlyConfigured, match="both set"),
    ):
        _ready()
