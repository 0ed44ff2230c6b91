"""The package's layout: subsystems in layers, imports only downwards, no cycles.

Read from the source (no import runs), so a violation is found wherever it
hides: inside a function, under ``TYPE_CHECKING``, in a subpackage.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "domain_event_broker"
NAME = "domain_event_broker"

#: Each part of the package and its layer: a part may import parts of lower
#: layers only (and its own modules). Public facades sit just above the
#: private subpackage they face.
LAYERS: dict[str, int] = {
    "_core": 0,
    "events": 1,
    "errors": 2,
    "_telemetry": 3,
    "telemetry": 4,
    "_amqp": 5,
    "_publishing": 6,
    "publish": 7,
    "_subscribing": 8,
    "subscribe": 9,
    "_deadletters": 10,
    "replay": 11,
    "_worker": 12,
    "_cli": 13,
    "cli": 14,
    "transport": 15,
    "testing": 15,
    "django": 15,
    "pytest_plugin": 16,
    "": 20,  # the package root, domain_event_broker/__init__.py
    "__main__": 21,
}

#: At most this many modules directly in the package folder.
MAX_TOP_LEVEL_MODULES = 16


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def part_of(module: str) -> str:
    """The layer key of a module: its first component below the package."""
    rest = module.split(".")[1:]
    return rest[0] if rest else ""


def imports_of(module: str, path: Path, known: set[str]) -> Iterator[str]:
    """Every module of the package that ``module`` imports, anywhere in its file."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == NAME or alias.name.startswith(NAME + "."):
                    yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not (target == NAME or target.startswith(NAME + ".")):
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                yield submodule if submodule in known else target


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {
        module: {target for target in imports_of(module, path, known) if target != module}
        for module, path in found.items()
    }


def test_every_part_of_the_package_has_a_layer() -> None:
    assert {part_of(module) for module in modules()} - set(LAYERS) == set()


def test_imports_only_go_downwards() -> None:
    upwards = [
        f"{module} imports {target}"
        for module, targets in graph().items()
        for target in targets
        if part_of(target) != part_of(module) and LAYERS[part_of(target)] >= LAYERS[part_of(module)]
    ]
    assert upwards == []


def test_no_import_cycles() -> None:
    edges = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_package_folder_lists_few_modules() -> None:
    top_level = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(top_level) <= MAX_TOP_LEVEL_MODULES, top_level


@pytest.mark.parametrize(
    "package", sorted(path.parent.name for path in PACKAGE.glob("_*/__init__.py"))
)
def test_each_subpackage_says_what_it_owns_and_may_import(package: str) -> None:
    doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text()))
    assert doc is not None
    assert "Owns" in doc
    assert "May import" in doc


# -- pika's private names: one module only --------------------------------------------

#: The one module that may touch pika's private names.
PIKA_DOOR = PACKAGE / "_amqp" / "pika_internals.py"


def _is_private(name: str) -> bool:
    return name.startswith("_") and name.strip("_") != "" and not name.endswith("__")


def private_names_defined(files: list[Path], *, own: bool) -> set[str]:
    """The private names ``files`` define: functions, classes, module and
    class variables, and attributes assigned on ``self`` or ``cls`` (with
    ``own=False``, on anything: pika's own modules set each other's)."""
    names: set[str] = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.alias) and node.asname:
                names.add(node.asname)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                on_self = isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"}
                if on_self or not own:
                    names.add(node.attr)
    return {name for name in names if _is_private(name)}


def pikas_private_names() -> set[str]:
    """Every private name pika defines, less those this package defines itself
    (outside the door: its own ``_channel`` is no use of pika's)."""
    pika_files = sorted(Path(pika.__file__).parent.rglob("*.py"))
    ours = [path for path in modules().values() if path != PIKA_DOOR]
    return private_names_defined(pika_files, own=False) - private_names_defined(ours, own=True)


def private_uses(path: Path, pikas: set[str], where: str = "") -> Iterator[str]:
    """Where ``path`` touches one of ``pikas``: an attribute, a name, an
    import from pika, or a name given to ``getattr`` and its kin."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        found = None
        if isinstance(node, ast.Attribute) and node.attr in pikas:
            found = f".{node.attr}"
        elif isinstance(node, ast.Name) and node.id in pikas:
            found = node.id
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "pika":
            private = [alias.name for alias in node.names if _is_private(alias.name)]
            found = ", ".join(private) or None
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in {"getattr", "hasattr", "setattr", "delattr"}
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value in pikas
        ):
            found = f"{node.func.id}(..., {node.args[1].value!r})"
        if found is not None:
            yield f"{where or module_name(path)}:{getattr(node, 'lineno', '?')}: {found}"


def test_only_pika_internals_touches_pikas_private_names() -> None:
    pikas = pikas_private_names()
    assert {"_impl", "_flush_output", "_closing_reason", "_terminate_stream"} <= pikas
    uses = [
        use for path in modules().values() if path != PIKA_DOOR for use in private_uses(path, pikas)
    ]
    assert uses == [], "pika's private names outside _amqp/pika_internals.py"


def test_the_private_names_check_finds_a_use(tmp_path: Path) -> None:
    pikas = pikas_private_names()
    source = tmp_path / "sneaky.py"
    source.write_text(
        "from pika.adapters.utils.io_services_utils import _AsyncPlaintextTransport\n"
        "def f(connection, channel):\n"
        "    connection._impl.params\n"
        "    channel._flush_output()\n"
        "    return getattr(channel, '_closing_reason', None)\n",
        encoding="utf-8",
    )
    found = [use.split(": ", 1)[1] for use in private_uses(source, pikas, "sneaky")]
    assert sorted(found) == sorted(
        [
            "_AsyncPlaintextTransport",
            "._impl",
            "._flush_output",
            "getattr(..., '_closing_reason')",
        ]
    )
