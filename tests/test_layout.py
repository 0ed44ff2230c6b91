"""The package's layout: subsystems in layers, imports only downwards, no cycles.

Read from the source (no import runs), so a violation is found wherever it
hides: inside a function, under ``TYPE_CHECKING``, in a subpackage.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

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
