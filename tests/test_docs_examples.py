"""Every Python example in README.rst and docs/ runs, so none can go stale.

Which blocks run (see "Documentation examples" in README.rst):

* every ``.. code-block:: python`` block (also ``code`` / ``sourcecode``,
  ``python3``, ``py``), and every ``::`` literal block whose text parses as
  Python; a ``::`` block that parses but is not Python (a ``rabbitmq.conf``
  line, say) must be written as a ``.. code-block::`` with its own language;
* except a block preceded by the RST comment ``.. test: skip`` (readers do
  not see comments), for fragments that cannot run on their own, such as a
  Django settings excerpt; it is still checked for undefined names.

Other comments readers do not see:

* ``.. test: django`` before a block runs it with Django set up (this
  package's app, ``django.contrib.auth``, a migrated SQLite database);
* ``.. test: setup`` with an indented body: code run before the next block,
  in the same process, to put the broker in the state the example talks
  about (dead letters to replay, say). It may not define names the example
  uses: the example alone must be complete.

Each block runs in a subprocess of its own, in an empty directory, against
the real broker: the blocks of one page run in order in a virtual host of
their own (created with ``rabbitmqctl``, deleted afterwards), so their
literal queue names collide with nobody's. ``Subscriber.start_consuming()``
without a timeout consumes for :data:`CONSUME_SECONDS`. Before running, each
block (with its setup) is checked for undefined names with ruff's pyflakes
rules, which also covers code inside handler functions that no event reaches.
New pages are picked up by themselves.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

from domain_event_broker._amqp import names as _names
from domain_event_broker._subscribing import topology as _topology
from domain_event_broker._subscribing.registration import Registration

from .helpers import rabbitmqctl_command

ROOT = Path(__file__).resolve().parent.parent

#: How long a worker example consumes before ``start_consuming()`` returns.
CONSUME_SECONDS = 2.0
#: Longest a block may run.
BLOCK_TIMEOUT = 90.0

_PYTHON_LANGUAGES = {"python", "python3", "py", "py3"}
_DIRECTIVE = re.compile(
    r"^(?P<indent>\s*)\.\. (?:code-block|code|sourcecode)::\s*(?P<lang>\S*)\s*$"
)
_MARKER = re.compile(r"^(?P<indent>\s*)\.\. test:\s*(?P<kind>[a-z-]+)\b")
_LITERAL = re.compile(r"^(?P<indent>\s*)(?!\.\. )\S.*::\s*$|^(?P<bare>\s*)::\s*$")
_MARKERS = {"skip", "django", "setup"}


@dataclass(frozen=True)
class Example:
    """One Python block of a documentation page."""

    path: Path
    line: int  # 1-based line of the block's first code line
    code: str
    setup: str = ""
    skip: bool = False
    django: bool = False

    @property
    def page(self) -> str:
        return (
            self.path.relative_to(ROOT).as_posix()
            if self.path.is_relative_to(ROOT)
            else str(self.path)
        )

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def source(self) -> str:
        """The code that runs: setup first, then the example."""
        return f"{self.setup}\n{self.code}" if self.setup else self.code


def documentation_pages(root: Path = ROOT) -> list[Path]:
    """README.rst and every .rst page under docs/ (new pages included)."""
    pages = [root / "README.rst"]
    pages += sorted(path for path in (root / "docs").rglob("*.rst") if "_build" not in path.parts)
    return [page for page in pages if page.is_file()]


def _indented_block(lines: list[str], start: int, indent: int) -> tuple[int, list[str]]:
    """The lines from ``start`` indented deeper than ``indent`` (blank lines
    inside included), and the index after them."""
    end = start
    body: list[str] = []
    while end < len(lines):
        line = lines[end]
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        body.append(line)
        end += 1
    while body and not body[-1].strip():
        body.pop()
    return end, body


def _first_code_line(lines: list[str], start: int, indent: int) -> int:
    """Skip a directive's option lines (``:caption: ...``) and blank lines."""
    index = start
    while index < len(lines):
        stripped = lines[index].strip()
        deeper = len(lines[index]) - len(lines[index].lstrip()) > indent
        if stripped and not (deeper and stripped.startswith(":")):
            break
        index += 1
    return index


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except SyntaxError:
        return False
    return True


def collect_examples(path: Path) -> list[Example]:
    """The Python blocks of one page, in order, with their markers."""
    lines = path.read_text(encoding="utf-8").splitlines()
    examples: list[Example] = []
    pending: set[str] = set()
    setup = ""
    index = 0
    while index < len(lines):
        line = lines[index]
        marker = _MARKER.match(line)
        if marker:
            kind = marker["kind"]
            if kind not in _MARKERS:
                raise ValueError(f"{path}:{index + 1}: unknown marker '.. test: {kind}'")
            indent = len(marker["indent"])
            index, body = _indented_block(lines, index + 1, indent)
            if kind == "setup":
                setup = textwrap.dedent("\n".join(body)).strip("\n")
            else:
                pending.add(kind)
            continue
        directive = _DIRECTIVE.match(line)
        literal = None if directive else _LITERAL.match(line)
        if directive or literal:
            match = directive or literal
            assert match is not None
            indent = len(match["indent"] if match["indent"] is not None else match["bare"])
            first = _first_code_line(lines, index + 1, indent)
            end, body = _indented_block(lines, first, indent)
            code = textwrap.dedent("\n".join(body))
            python = (
                directive["lang"].lower() in _PYTHON_LANGUAGES
                if directive
                else bool(code.strip()) and _parses(code)
            )
            if python and code.strip():
                examples.append(
                    Example(
                        path,
                        first + 1,
                        code,
                        setup=setup,
                        skip="skip" in pending,
                        django="django" in pending,
                    )
                )
                setup = ""
            pending = set()
            index = max(end, index + 1)
            continue
        if line.strip():
            pending = set()  # a marker applies to the block right after it
        index += 1
    return examples


def all_examples() -> list[Example]:
    return [example for page in documentation_pages() for example in collect_examples(page)]


# -- running ------------------------------------------------------------------------------

# Run before every block (not shown to readers): a worker example consumes
# for a few seconds instead of until SIGTERM.
_PRELUDE = f"""
import domain_event_broker as _deb

_start_consuming = _deb.Subscriber.start_consuming

def _consume_a_while(self, timeout=None):
    return _start_consuming(self, timeout={CONSUME_SECONDS} if timeout is None else timeout)

_deb.Subscriber.start_consuming = _consume_a_while
del _deb
"""

_DJANGO_PRELUDE = """
import django
from django.conf import settings

settings.configure(
    SECRET_KEY="documentation examples",
    INSTALLED_APPS=[
        "django.contrib.auth",
        "django.contrib.contenttypes",
        "domain_event_broker.django",
    ],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": "db.sqlite3"}},
    DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    USE_TZ=True,
)
django.setup()
from django.core.management import call_command

call_command("migrate", verbosity=0)
del call_command, settings, django
"""


def static_problems(example: Example) -> str:
    """Undefined names and other pyflakes findings, as ruff reports them.

    The example is checked without its setup: it must be complete on its own.
    """
    result = subprocess.run(
        [
            *(sys.executable, "-m", "ruff", "check", "--isolated", "--no-cache"),
            *("--output-format", "concise"),
            *("--select", "F", "--ignore", "F401,F841", "--stdin-filename", "example.py", "-"),
        ],
        input=example.code,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return "" if result.returncode == 0 else result.stdout + result.stderr


def run_example(
    example: Example, broker_url: str, workdir: Path
) -> subprocess.CompletedProcess[str]:
    """Run one block in a subprocess against ``broker_url``."""
    prelude = _PRELUDE + (_DJANGO_PRELUDE if example.django else "")
    script = workdir / "example.py"
    script.write_text(f"{prelude}\n{example.source}\n", encoding="utf-8")
    env = {
        **os.environ,
        "DOMAIN_EVENT_BROKER": broker_url,
        "PYTHONPATH": str(ROOT),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    env.pop("DJANGO_SETTINGS_MODULE", None)
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT,
        check=False,
    )


# -- a virtual host per page --------------------------------------------------------------


class VirtualHosts:
    """One throw-away virtual host per documentation page."""

    def __init__(self, command: list[str], broker_url: str) -> None:
        self.command = command
        self.broker_url = broker_url
        self.user = urlsplit(broker_url).username or "guest"
        self.hosts: dict[str, str] = {}

    def _ctl(self, *args: str) -> None:
        subprocess.run([*self.command, "-q", *args], check=True, capture_output=True, timeout=60)

    def url_for(self, page: str) -> str:
        if page not in self.hosts:
            vhost = f"deb-docs-{uuid.uuid4().hex[:10]}"
            self._ctl("add_vhost", vhost)
            self.hosts[page] = vhost
            self._ctl("set_permissions", "-p", vhost, self.user, ".*", ".*", ".*")
        parts = urlsplit(self.broker_url)
        return urlunsplit(parts._replace(path="/" + quote(self.hosts[page], safe="")))

    def delete_all(self) -> None:
        for vhost in self.hosts.values():
            subprocess.run(
                [*self.command, "-q", "delete_vhost", vhost],
                capture_output=True,
                timeout=60,
                check=False,
            )
        self.hosts.clear()


@pytest.fixture(scope="module")
def virtual_hosts(broker_url: str) -> Iterator[VirtualHosts]:
    command = rabbitmqctl_command()
    try:
        subprocess.run([*command, "-q", "list_vhosts"], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        message = f"rabbitmqctl is needed to run the documentation examples: {exc}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    hosts = VirtualHosts(command, broker_url)
    yield hosts
    hosts.delete_all()


EXAMPLES = all_examples()


@pytest.mark.parametrize("example", EXAMPLES, ids=[example.id for example in EXAMPLES])
def test_documentation_example_runs(
    example: Example, virtual_hosts: VirtualHosts, tmp_path: Path
) -> None:
    problems = static_problems(example)
    assert not problems, f"{example.id} is not complete:\n{problems}"
    if example.skip:
        pytest.skip("marked '.. test: skip' in the page (checked, not run)")
    result = run_example(example, virtual_hosts.url_for(example.page), tmp_path)
    assert result.returncode == 0, (
        f"{example.id} failed (exit status {result.returncode}):\n{result.stdout}\n{result.stderr}"
    )


# -- the collector itself -------------------------------------------------------------------


def test_every_page_is_collected() -> None:
    pages = {page.relative_to(ROOT).as_posix() for page in documentation_pages()}
    assert "README.rst" in pages
    assert pages >= {f"docs/{path.name}" for path in (ROOT / "docs").glob("*.rst")}
    collected = {example.page for example in EXAMPLES}
    assert {"README.rst", "docs/publishing.rst", "docs/subscribing.rst"} <= collected


_BROKEN_PAGE = """\
Title
=====

.. code-block:: python

    from domain_event_broker import Subscriber

    def handler(event):
        mailer.send(event.data)

Text::

    raise RuntimeError("stale example")

.. test: skip

.. code-block:: python

    this would not even parse

::

    consumer_timeout 3600000

.. code-block:: console

    $ not python
"""


def test_collector_finds_blocks_and_markers(tmp_path: Path) -> None:
    page = tmp_path / "page.rst"
    page.write_text(_BROKEN_PAGE, encoding="utf-8")
    examples = collect_examples(page)
    assert [(example.line, example.skip) for example in examples] == [
        (6, False),
        (13, False),
        (19, True),
    ]
    assert examples[0].code.startswith("from domain_event_broker import Subscriber\n")


def test_a_broken_example_fails(broker_url: str, tmp_path: Path) -> None:
    """The checks catch an undefined name in a handler and an error at run time."""
    page = tmp_path / "page.rst"
    page.write_text(_BROKEN_PAGE, encoding="utf-8")
    undefined, raising, _ = collect_examples(page)
    assert "F821 Undefined name `mailer`" in static_problems(undefined)
    assert static_problems(raising) == ""
    result = run_example(raising, broker_url, tmp_path)
    assert result.returncode != 0
    assert "stale example" in result.stderr


def test_unknown_marker_is_refused(tmp_path: Path) -> None:
    page = tmp_path / "page.rst"
    page.write_text(".. test: skipp\n\n.. code-block:: python\n\n    pass\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unknown marker"):
        collect_examples(page)


# -- the topology picture (docs/_ext/topology.py) -------------------------------------------


def _topology_extension() -> Any:
    pytest.importorskip("sphinx", reason="the docs dependency group is not installed")
    spec = importlib.util.spec_from_file_location(
        "docs_topology", ROOT / "docs" / "_ext" / "topology.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_topology_picture_is_drawn_from_the_topology_code() -> None:
    topology = _topology_extension()
    name = "pictured"
    graph = topology.handler_graph(name, ["user.*"], [10, 0.25], True)
    declared = {key.partition(":")[2] for key in graph.nodes if ":" in key}
    assert declared == {
        _names.DEFAULT_EXCHANGE,
        name,
        _names.retry_exchange(name),
        _names.dead_letter_exchange(name),
        _names.dead_letter_queue(name),
        _names.durable_retry_exchange(name),
        _names.durable_dead_letter_exchange(name),
        _names.typed_delay_queue(name, 10_000, "classic"),
        _names.typed_delay_queue(name, 250, "classic"),
    }
    edges = {(edge.source, edge.target, edge.style) for edge in graph.edges}
    retry_route = _topology.declare_delay(
        topology.RecordingChannel(), graph_registration(name), 250, "topic"
    )
    assert ("handler", topology._node_for(*retry_route), "retry") in edges
    assert (
        f"queue:{name}",
        f"exchange:{_names.dead_letter_exchange(name)}",
        "dead-letter",
    ) in edges
    svg = topology.render(graph, "title")
    assert svg.startswith("<svg ") and svg.endswith("</svg>")
    for object_name in declared:
        assert f">{object_name}</text>" in svg


def test_topology_picture_refuses_a_channel_call_it_does_not_know() -> None:
    topology = _topology_extension()
    with pytest.raises(AttributeError, match=r"teach docs/_ext/topology\.py"):
        topology.RecordingChannel().basic_publish("", "q", b"")


def graph_registration(name: str) -> Registration:
    return Registration(handler=lambda event: None, name=name, binding_keys=("user.*",))
