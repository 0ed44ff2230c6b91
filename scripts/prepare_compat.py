"""Unpack 3.0.2's test suite from its wheel for `make compat`.

The tests run unmodified, except:

* ``test_events.py`` and ``django/test_publish_on_commit.py`` patch 3.0.2's
  private module paths; they are left out;
* ``from .. import settings`` imported 3.0.2's private settings module; it is
  replaced by the default URL, as DESIGN.md allows.
"""

from __future__ import annotations

import shutil
import sys
import zipfile
from pathlib import Path

SKIPPED = {"test_events.py", "django/test_publish_on_commit.py"}
SETTINGS_IMPORT = "from .. import settings"
SETTINGS_SUBSTITUTE = (
    "from types import SimpleNamespace\n"
    "settings = SimpleNamespace(BROKER='amqp://guest:guest@localhost:5672/%2F')"
)
# pytest-django runs 3.0.2's Django tests with 3.0.2's settings module; ``-p
# django`` loads it even when plugin autoloading is off, and no manage.py is
# searched for (the settings module is found through the current directory).
PYTEST_INI = """[pytest]
addopts = -p no:cacheprovider -p django -ra
timeout = 120
DJANGO_SETTINGS_MODULE = deb302_tests.django.test_settings
django_find_project = false
"""


def main(wheel_dir: str, out_dir: str) -> None:
    (wheel,) = Path(wheel_dir).glob("domain_event_broker-*.whl")
    target = Path(out_dir) / "deb302_tests"
    shutil.rmtree(target, ignore_errors=True)
    prefix = "domain_event_broker/tests/"
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if not name.startswith(prefix) or not name.endswith(".py"):
                continue
            relative = name[len(prefix) :]
            if relative in SKIPPED:
                continue
            text = archive.read(name).decode("utf-8")
            text = text.replace(SETTINGS_IMPORT, SETTINGS_SUBSTITUTE)
            path = target / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    (Path(out_dir) / "pytest.ini").write_text(PYTEST_INI, encoding="utf-8")
    print(f"prepared {len(list(target.rglob('test_*.py')))} test modules from {wheel.name}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
