"""Django settings for the test suite.

The pytest process builds its ``DATABASES`` in ``conftest.py``; relay
subprocesses started by the tests get the test databases' names through the
``DEB_TEST_DATABASES`` environment variable (JSON).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from tests.helpers import BROKER_URL

SECRET_KEY = "domain-event-broker tests"
INSTALLED_APPS = ["domain_event_broker.django"]
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DOMAIN_EVENT_BROKER = BROKER_URL

DATABASES = (
    json.loads(os.environ["DEB_TEST_DATABASES"])
    if "DEB_TEST_DATABASES" in os.environ
    else {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(Path(tempfile.gettempdir()) / "deb-django-tests.sqlite3"),
        }
    }
)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "loggers": {"domain_event_broker": {"handlers": ["stderr"], "level": "INFO"}},
}
