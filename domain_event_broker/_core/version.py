"""The library's version, in one place (``pyproject.toml`` reads it from here)."""

__version__ = "4.1.0"
