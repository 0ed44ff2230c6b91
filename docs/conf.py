"""Sphinx configuration for domain-event-broker (``make docs``)."""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# docs/_ext: this documentation's own extensions (the topology picture).
sys.path.insert(0, str(Path(__file__).resolve().parent / "_ext"))

# The Django integration's API is documented with autodoc, which imports its
# models: give Django minimal settings (nothing connects to a database).
try:
    import django
    from django.conf import settings as django_settings
except ImportError:  # pragma: no cover - the dev dependency group installs Django
    django = None
else:
    if not django_settings.configured:
        django_settings.configure(
            INSTALLED_APPS=["domain_event_broker.django"],
            DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
            USE_TZ=True,
        )
    django.setup()

project = "domain-event-broker"
author = "domain-event-broker contributors"
copyright = "domain-event-broker contributors"
try:
    release = version("domain-event-broker")
except PackageNotFoundError:
    release = "4.0"
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "topology",
]

# Docstrings follow the Google style (Args / Returns / Raises).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"

exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []
