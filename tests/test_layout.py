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


# --- no reach-ins (issue 12, item 3; STYLE.md habits 13 and 14) ---------------
# Counted over src/surge with ast; each function lists its findings as
# "path:line what", so a failure says where.

# namedtuple's own API, underscored so as not to clash with field names
_NAMEDTUPLE_API = frozenset({"_asdict", "_field_defaults", "_fields", "_make", "_replace"})


def _sources(root: Path) -> Iterator[tuple[str, str, ast.Module]]:
    """(path relative to root, dotted module name, tree) of every module."""
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        yield str(path.relative_to(root)), ".".join(parts), ast.parse(path.read_text(), str(path))


def _in_transports(rel: str) -> bool:
    return rel.startswith("transports/")


def transport_probes(root: Path) -> list[str]:
    """``getattr`` / ``hasattr`` on a transport outside surge/transports: a
    member the protocols do not declare, looked for (use a capability)."""
    found: list[str] = []
    for rel, _, tree in _sources(root):
        if _in_transports(rel):
            continue
        found.extend(
            f"{rel}:{node.lineno} {ast.unparse(node)}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr")
            and node.args
            and "transport" in ast.unparse(node.args[0]).lower()
        )
    return found


def concrete_transport_checks(root: Path) -> list[str]:
    """``isinstance`` / ``issubclass`` against a concrete transport class
    (any class named ``*Transport`` but the protocol) outside surge/transports."""
    classes = {
        node.name
        for _, _, tree in _sources(root)
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef) and node.name.endswith("Transport")
    } - {"Transport"}
    found: list[str] = []
    for rel, _, tree in _sources(root):
        if _in_transports(rel):
            continue
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("isinstance", "issubclass")
                and len(node.args) == 2
            ):
                named = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
                named |= {n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)}
                if named & classes:
                    found.append(f"{rel}:{node.lineno} {ast.unparse(node)}")
    return found


def private_imports_across_packages(root: Path) -> list[str]:
    """Imports from another package (core, transports, http, observe, ...;
    ``package_of``) of an underscored name, or of any name out of another
    package's underscored module (the core's are the layer all build on),
    ``if TYPE_CHECKING:`` blocks included."""
    found: list[str] = []
    for rel, module, tree in _sources(root):
        is_package = rel.endswith("__init__.py")
        mine = package_of(module)
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            (base,) = resolve(module, is_package, node)[:1] or [""]
            if not base:
                continue
            if node.module is None:
                base = base.rsplit(".", 1)[0]
            theirs = package_of(base)
            if theirs == mine:
                continue
            private_module = theirs != "core" and any(
                p.startswith("_") and not p.startswith("__") for p in base.split(".")
            )
            for alias in node.names:
                private_name = alias.name.startswith("_") and not alias.name.startswith("__")
                if private_name or private_module:
                    found.append(f"{rel}:{node.lineno} from {base} import {alias.name}")
    return found


def _by_id(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "id"


def _keyed_by_id(node: ast.AST, module_level: set[str]) -> bool:
    """``node`` looks a module-level container up, stores or tests by ``id(...)``."""

    def held(n: ast.AST) -> bool:
        return isinstance(n, ast.Name) and n.id in module_level

    if isinstance(node, ast.Subscript):
        return held(node.value) and _by_id(node.slice)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return held(node.func.value) and bool(node.args) and _by_id(node.args[0])
    if isinstance(node, ast.Compare):
        return (
            _by_id(node.left)
            and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops)
            and any(held(c) for c in node.comparators)
        )
    return False


def id_keyed_module_state(root: Path) -> list[str]:
    """A module-level container looked up, stored into or tested by
    ``id(obj)``: per-object state that outlives its object (an id is
    reused once the object is collected); keep it on the object."""
    found: list[str] = []
    for rel, _, tree in _sources(root):
        module_level = set()
        for stmt in tree.body:
            if isinstance(stmt, ast.Assign):
                module_level |= {t.id for t in stmt.targets if isinstance(t, ast.Name)}
            elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                module_level.add(stmt.target.id)
        found.extend(
            f"{rel}:{getattr(node, 'lineno', 0)} {ast.unparse(node)}"
            for node in ast.walk(tree)
            if _keyed_by_id(node, module_level)
        )
    return found


def private_reach_ins(root: Path) -> list[str]:
    """Reads and writes of ``x._name`` where ``x`` is not ``self`` / ``cls``
    and no class or function of this module defines ``_name`` (a method, a
    slot, a class attribute or ``self._name = ...``): another module's
    object's private state."""
    found: list[str] = []
    for rel, _, tree in _sources(root):
        own: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id in ("self", "cls")
            ):
                own.add(node.attr)
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            for stmt in cls.body:
                if isinstance(stmt, ast.Assign):
                    for t in stmt.targets:
                        if isinstance(t, ast.Name):
                            own.add(t.id)
                            if t.id == "__slots__" and isinstance(stmt.value, ast.Tuple):
                                own |= {
                                    e.value
                                    for e in stmt.value.elts
                                    if isinstance(e, ast.Constant) and isinstance(e.value, str)
                                }
                elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    own.add(stmt.target.id)
        found.extend(
            f"{rel}:{node.lineno} {ast.unparse(node)}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            and node.attr not in own
            and node.attr not in _NAMEDTUPLE_API
        )
    return found


def test_no_reach_ins() -> None:
    """Over src/surge: no getattr probes of transports, no isinstance on a
    concrete transport outside surge/transports, no private names imported
    across packages, no id()-keyed module state, and at most 10 touches of
    another module's object's private attributes (issue 12's targets)."""
    found = {
        "transport probes": transport_probes(SRC),
        "concrete transport checks": concrete_transport_checks(SRC),
        "private imports across packages": private_imports_across_packages(SRC),
        "id()-keyed module state": id_keyed_module_state(SRC),
    }
    assert found == {name: [] for name in found}
    reach_ins = private_reach_ins(SRC)
    assert len(reach_ins) <= 10, "\n".join(reach_ins)
