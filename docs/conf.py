"""Sphinx configuration for domain-event-broker (``make docs``)."""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# docs/_ext: this documentation's own extensions (the topology picture).
sys.path.insert(0, str(Path(__file__).resolve().parent / "_ext"))

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
