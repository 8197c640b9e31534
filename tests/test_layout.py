"""The package layout keeps its promises: dependencies point one way, the
core loads without the optional parts, every public module says what it
exports (docs/architecture.md, "Packages")."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import surge

SRC = Path(surge.__file__).parent

# Layers, bottom first: a package may import its own layer and those below.
# "core" is surge/_*.py; "api" is surge/__init__.py, which re-exports the
# core and the triggers.
LAYERS = {
    "core": 0,
    "transports": 1,
    "testing": 2,
    "triggers": 2,
    "http": 2,
    "api": 3,
    "asyncapi": 3,
    "observe": 3,
    "examples": 4,
    "tools": 5,
    "cli": 6,
}
# Imports that go up on purpose, made at use time only (never at import time).
UPWARD = {
    # App opens its transport by URL (surge.transports.open_transport)
    ("core", "transports"),
    # App.http makes the ingress on first use
    ("core", "http"),
    # App.every / cron / when delegate to the triggers
    ("core", "triggers"),
}


def package_of(module: str) -> str:
    """The package a dotted module name belongs to (``surge._app`` is core)."""
    parts = module.split(".")
    assert parts[0] == "surge", module
    if len(parts) == 1:
        return "api"
    if parts[1] == "__main__":
        return "cli"
    return "core" if parts[1].startswith("_") else parts[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """The surge modules an ``import from`` names."""
    if node.level == 0:
        base = node.module or ""
    else:
        here = module.split(".") if is_package else module.split(".")[:-1]
        here = here[: len(here) - node.level + 1]
        base = ".".join(here + ([node.module] if node.module else []))
    if not base.startswith("surge"):
        return []
    if node.module is None:  # from . import a, b: submodules or names
        return [f"{base}.{alias.name}" for alias in node.names]
    return [base]


class Imports(ast.NodeVisitor):
    """The surge modules one file imports: at import time, and at all (also
    inside functions: lazy imports and ``importlib.import_module``), leaving
    out ``if TYPE_CHECKING:`` blocks."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.module = module
        self.is_package = is_package
        self.depth = 0
        self.at_import: set[str] = set()
        self.at_all: set[str] = set()

    def add(self, names: list[str]) -> None:
        self.at_all.update(names)
        if self.depth == 0:
            self.at_import.update(names)

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_Import(self, node: ast.Import) -> None:
        self.add([a.name for a in node.names if a.name.split(".")[0] == "surge"])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.add(resolve(self.module, self.is_package, node))

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        named = isinstance(func, ast.Attribute) and func.attr == "import_module"
        if named and node.args and isinstance(node.args[0], ast.Constant):
            target = node.args[0].value
            if isinstance(target, str) and target.startswith("surge."):
                self.add([target])
        self.generic_visit(node)


def scan() -> Iterator[tuple[str, Imports]]:
    for path in sorted(SRC.rglob("*.py")):
        module = module_name(path)
        found = Imports(module, path.name == "__init__.py")
        found.visit(ast.parse(path.read_text(), str(path)))
        yield module, found


def test_dependencies_point_down_the_layers() -> None:
    """No module imports a package of a higher layer, lazily or not, but for
    the use-time doors listed in UPWARD (never at import time)."""
    wrong = []
    for module, found in scan():
        mine = package_of(module)
        for target in sorted(found.at_all):
            theirs = package_of(target)
            if LAYERS[theirs] <= LAYERS[mine]:
                continue
            lazy_ok = (mine, theirs) in UPWARD and target not in found.at_import
            if not lazy_ok:
                wrong.append(f"{module} ({mine}) imports {target} ({theirs})")
    assert wrong == []


def test_no_import_cycle_between_packages() -> None:
    """The packages' import-time graph has no cycle."""
    edges: dict[str, set[str]] = {}
    for module, found in scan():
        mine = package_of(module)
        for target in found.at_import:
            theirs = package_of(target)
            if theirs != mine:
                edges.setdefault(mine, set()).add(theirs)

    def cycle_from(start: str, path: list[str]) -> list[str] | None:
        for nxt in sorted(edges.get(path[-1], ())):
            if nxt == start:
                return [*path, nxt]
            if nxt not in path:
                found = cycle_from(start, [*path, nxt])
                if found:
                    return found
        return None

    cycles = [c for p in sorted(edges) if (c := cycle_from(p, [p])) is not None]
    assert cycles == []


def test_core_imports_no_optional_package() -> None:
    """Importing surge (and its transports and testing tools) loads none of
    http, observe, cli or tools."""
    code = (
        "import sys, surge, surge.transports, surge.testing\n"
        "app = surge.App('layout')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[:2] in "
        "(['surge', 'http'], ['surge', 'observe'], ['surge', 'cli'], ['surge', 'tools'])))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_http_loads_without_observe_and_reading_app_http_instruments_nothing() -> None:
    """surge.http does not import surge.observe, and an app's ingress made by
    reading app.http leaves the app untimed until surge.observe is mounted."""
    code = (
        "import sys, surge\n"
        "class Placed(surge.Event):\n    n: int\n"
        "app = surge.App('layout')\n"
        "app.http.post('/x', publish=Placed)\n"
        "print(app.timings is None, any(m.startswith('surge.observe') for m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.split() == ["True", "False"]


def public_modules() -> list[str]:
    found = pkgutil.walk_packages(surge.__path__, "surge.")
    return ["surge"] + [
        info.name
        for info in found
        if not any(part.startswith("_") for part in info.name.split("."))
    ]


@pytest.mark.parametrize("name", public_modules())
def test_every_public_module_defines_all(name: str) -> None:
    """A public module lists its exports in a tuple __all__, each of which exists."""
    module = importlib.import_module(name)
    exported = module.__dict__.get("__all__")
    assert isinstance(exported, tuple), f"{name}.__all__ is {type(exported).__name__}"
    missing = [n for n in exported if not hasattr(module, n)]
    assert missing == []


def test_http_exports_the_ingress_not_the_load_generator() -> None:
    """The load generator's client lives in surge.tools, not in surge.http's API."""
    import surge.http
    import surge.tools

    assert {"fetch", "Response", "run_load", "LoadReport"}.isdisjoint(surge.http.__all__)
    assert {"fetch", "Response", "run_load", "LoadReport"} <= set(surge.tools.__all__)
