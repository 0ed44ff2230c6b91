"""Minimal Django settings for the ``replay_domain_event`` command tests."""

SECRET_KEY = "replay-tests"
INSTALLED_APPS = ["domain_event_broker.django"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
USE_TZ = True
