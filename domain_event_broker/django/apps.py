"""The Django app ``domain_event_broker.django`` (3.0.2's dotted path and label)."""

from __future__ import annotations

from django.apps import AppConfig
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from .._amqp.config import configure, read_broker_file
from ..errors import ConfigurationError

#: The Django setting holding the broker URL, list of URLs, or ``None``.
SETTING = "DOMAIN_EVENT_BROKER"
#: The Django setting naming a file that holds the URL(s) (a mounted secret).
FILE_SETTING = "DOMAIN_EVENT_BROKER_FILE"
#: The Django setting holding the default queue type (4.1): "classic" or "quorum".
QUEUE_TYPE_SETTING = "DOMAIN_EVENT_BROKER_QUEUE_TYPE"


class DomainEventsConfig(AppConfig):
    """Reads the ``DOMAIN_EVENT_BROKER`` setting when Django starts.

    The setting may be an AMQP URL, a list of URLs of one cluster, or
    ``None`` to disable publishing (events are then returned and not sent).
    Left out, or blank, the library's default applies. It is passed to
    :func:`domain_event_broker.configure`, so the ``DOMAIN_EVENT_BROKER``
    environment variable and explicit ``connection_settings`` arguments still
    take precedence.

    ``DOMAIN_EVENT_BROKER_FILE`` may name a file holding the URL(s) instead,
    so that the password stays out of the settings module; setting both is
    an error.

    .. versionchanged:: 4.1
       The ``DOMAIN_EVENT_BROKER_FILE`` setting.
    """

    name = "domain_event_broker.django"
    label = "domain_event_broker_django"
    verbose_name = "Domain Events"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Pass the ``DOMAIN_EVENT_BROKER`` setting to :func:`configure`.

        Raises:
            ImproperlyConfigured: the setting is not a URL, a list of URLs or
                ``None``, a URL is malformed, the file cannot be read, both
                settings are set, or the queue type is unknown.
        """
        if hasattr(settings, QUEUE_TYPE_SETTING):
            try:
                configure(queue_type=getattr(settings, QUEUE_TYPE_SETTING))
            except ConfigurationError as exc:
                raise ImproperlyConfigured(f"settings.{QUEUE_TYPE_SETTING}: {exc}") from exc
        path = getattr(settings, FILE_SETTING, None)
        if path:
            if getattr(settings, SETTING, None):
                raise ImproperlyConfigured(
                    f"settings.{SETTING} and settings.{FILE_SETTING} are both set: set one"
                )
            try:
                configure(broker=read_broker_file(str(path), source=f"settings.{FILE_SETTING}"))
            except ConfigurationError as exc:
                raise ImproperlyConfigured(str(exc)) from exc
            return
        if not hasattr(settings, SETTING):
            return
        broker = getattr(settings, SETTING)
        if isinstance(broker, str) and not broker.strip():
            return  # 3.0.2 read '' as "the default broker"
        try:
            configure(broker=broker)
        except ConfigurationError as exc:
            raise ImproperlyConfigured(f"settings.{SETTING}: {exc}") from exc
