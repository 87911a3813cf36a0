"""The package layering has no upward import (issue 13).

    simulations/  (command line, launchers, simulation, benchmarks)
        -> server/, client/
            -> common/

``server/`` and ``client/`` never import ``simulations/`` nor each other; ``common/`` imports none of
the three. Every import counts: module-level, inside functions and ``if TYPE_CHECKING:`` blocks,
``import x`` and ``from x import y``, absolute and relative. The project's modules also import one
another without a cycle, so each layer can be read, tested and replaced from the bottom up. The
benchmarks (``simulations/bench/``) sit apart, on top: only ``simulations/cli.py`` imports them.

The wheel has one top-level package, ``fedpriv``: the folders map to ``fedpriv.common``,
``fedpriv.client``, ``fedpriv.server`` and ``fedpriv.simulations`` (``[tool.setuptools.package-dir]``)
and ``src/fedpriv/__init__.py`` is the Python API on top of them all. Every import of the project
goes through ``fedpriv.``; a bare ``import common`` would only work from a source checkout. Below,
a module's name drops the ``fedpriv.`` prefix (``common.config`` is ``fedpriv.common.config``) and the
API package is ``fedpriv``.

The check reads the source with ``ast`` and imports nothing, so it is fast and has no side effects.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "client", "server", "simulations")
TOP = "fedpriv"  # the installed package; its own __init__ (src/fedpriv/) is the Python API
BENCH = "simulations.bench"  # the benchmarks: apart from the product, on top of it

# What each package may not import, at any depth, by any route.
FORBIDDEN: dict[str, frozenset[str]] = {
    "common": frozenset({"client", "server", "simulations", TOP}),
    "client": frozenset({"server", "simulations", TOP}),
    "server": frozenset({"client", "simulations", TOP}),
    "simulations": frozenset({TOP}),
    TOP: frozenset(),
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the four packages and of the API package, by dotted name (a package by its
    ``__init__.py``; ``fedpriv.`` dropped)."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            found[module_name(path, root)] = path
    for path in sorted((root / "src").rglob("*.py")):
        found[module_name(path, root / "src")] = path
    return found


def short_name(target: str) -> str:
    """``fedpriv.common.x`` -> ``common.x`` (the layer's own name); anything else unchanged."""
    head, _, rest = target.partition(".")
    if head == TOP and rest.split(".")[0] in PACKAGES:
        return rest
    return target


def _from_base(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module that ``from ... import`` reads from (relative levels resolved)."""
    if not node.level:
        return short_name(node.module or "")
    package = module if is_package else module.rpartition(".")[0]
    base_parts = package.split(".") if package else []
    up = node.level - 1
    if up > len(base_parts):
        raise ValueError(f"{module}:{node.lineno}: relative import beyond the top package")
    base_parts = base_parts[:len(base_parts) - up]
    return ".".join(base_parts + ([node.module] if node.module else []))


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int]]:
    """``(module, line)`` for every ``import x`` (``x``) and ``from x import y`` (``x``) in ``tree``."""
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((short_name(alias.name), node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append((_from_base(node, module, is_package), node.lineno))
    return found


def imported_names(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int]]:
    """``(dotted target, line)`` for every import anywhere in ``tree``; relative ones made absolute.

    ``from x import y`` yields ``x.y`` (which is ``x``'s submodule ``y`` when there is one, and is
    resolved against the known modules by :func:`edges`)."""
    names: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend((short_name(alias.name), node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(node, module, is_package)
            for alias in node.names:
                names.append((f"{base}.{alias.name}" if alias.name != "*" else base, node.lineno))
    return names


def resolve(target: str, known: set[str]) -> str | None:
    """The project module ``target`` names: itself, or its longest known prefix (a name imported from
    a module); ``None`` outside the project."""
    parts = target.split(".")
    while parts:
        name = ".".join(parts)
        if name in known:
            return name
        parts.pop()
    return None


def edges(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """``{importer: {imported project module: first line}}`` (self-imports dropped)."""
    known = set(modules)
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        out: dict[str, int] = {}
        for target, line in imported_names(tree, name, path.name == "__init__.py"):
            # Top-level names of the four packages count even when the module does not exist (yet).
            hit = resolve(target, known) or (target if target.split(".")[0] in (*PACKAGES, TOP) else None)
            if hit and hit != name:
                out.setdefault(hit, line)
        graph[name] = out
    return graph


def layer_violations(graph: dict[str, dict[str, int]], modules: dict[str, Path]) -> list[str]:
    found = []
    for importer, targets in sorted(graph.items()):
        mine = importer.split(".")[0]
        for target, line in sorted(targets.items()):
            theirs = target.split(".")[0]
            if theirs in FORBIDDEN[mine]:
                where = modules[importer].relative_to(ROOT)
                found.append(f"{where}:{line}: {mine}/ imports {target} ({theirs}/)")
    return found


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    result: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, {}))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    result.append(sorted(component))
    return sorted(result)


def describe_cycle(component: list[str], graph: dict[str, dict[str, int]], modules: dict[str, Path]) -> str:
    members = set(component)
    links = [f"{modules[a].relative_to(ROOT)}:{line} -> {b}"
             for a in component for b, line in sorted(graph[a].items()) if b in members]
    return "cycle among " + ", ".join(component) + "\n    " + "\n    ".join(links)


# ----------------------------------------------------------------------------- the rules


@pytest.fixture(scope="module")
def project():
    modules = project_modules()
    return modules, edges(modules)


def bare_imports(tree: ast.AST) -> list[tuple[str, int]]:
    """``(module, line)`` of absolute imports of ``common``, ``client``, ``server`` or ``simulations``
    without the ``fedpriv.`` prefix: names an installed wheel does not have."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in PACKAGES:
            found.append((node.module or "", node.lineno))
    return found


def test_finds_the_packages(project):
    modules, _ = project
    for package in (*PACKAGES, TOP):
        assert package in modules, f"{package}/__init__.py not found"
    assert len(modules) > 40  # the walk really found the source


def test_no_upward_or_sideways_import(project):
    modules, graph = project
    found = layer_violations(graph, modules)
    assert not found, ("imports against the layering simulations/ -> server/, client/ -> common/:\n  "
                       + "\n  ".join(found))


def test_every_import_goes_through_the_one_installed_package(project):
    """``import common`` works from a checkout only; the wheel's one top-level package is ``fedpriv``."""
    modules, _ = project
    files = {**{n: p for n, p in modules.items()}, **{p.stem: p for p in (ROOT / "tests").rglob("*.py")}}
    found = [f"{path.relative_to(ROOT)}:{line}: imports {target}"
             for path in sorted(set(files.values()))
             for target, line in bare_imports(ast.parse(path.read_text(encoding="utf-8")))]
    assert not found, "\n  ".join(["imports without the fedpriv. prefix:", *found])


def test_no_import_cycle(project):
    modules, graph = project
    found = cycles(graph)
    assert not found, "\n".join(describe_cycle(c, graph, modules) for c in found)


def test_the_product_does_not_import_the_benchmarks(project):
    """Benchmarks live apart, in simulations/bench/: only the command line, to add ``fedpriv bench``, imports them."""
    modules, graph = project
    found = [f"{modules[a].relative_to(ROOT)}:{line}: imports {b}"
             for a, targets in sorted(graph.items()) if not a.startswith(BENCH) and a != "simulations.cli"
             for b, line in sorted(targets.items()) if b == BENCH or b.startswith(BENCH + ".")]
    assert not found, "\n  ".join(["the product imports the benchmarks:", *found])


def test_every_project_import_names_an_existing_module(project):
    """A module moved to another layer leaves no import of its old place behind (even in a function)."""
    modules, _ = project
    stale = []
    for name, path in sorted(modules.items()):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for target, line in imported_modules(tree, name, path.name == "__init__.py"):
            if target.split(".")[0] in PACKAGES and target not in modules:
                stale.append(f"{path.relative_to(ROOT)}:{line}: imports {target}, which does not exist")
    assert not stale, "\n  ".join(["imports of modules that are not there:", *stale])


# ----------------------------------------------------------------------------- the checker itself


def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in PACKAGES:
        (tmp_path / package).mkdir(exist_ok=True)
        (tmp_path / package / "__init__.py").touch()
    return {module_name(p, tmp_path): p for package in PACKAGES for p in sorted((tmp_path / package).rglob("*.py"))}


def test_checker_sees_every_kind_of_import(tmp_path):
    modules = _tree(tmp_path, {
        "common/a.py": "def f():\n    from fedpriv.client import b\n",          # inside a function
        "client/b.py": "import fedpriv.server.c\n",                                 # import x
        "server/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..simulations.d import X\n",
        "simulations/d.py": "from . import e\n",                                   # relative, allowed
        "simulations/e.py": "from .pkg.f import g\n",
        "simulations/pkg/__init__.py": "from .f import g\n",
        "simulations/pkg/f.py": "from .. import d\n",                             # cycle d -> e -> f -> d
        "client/g.py": "from fedpriv.common.a import *\n",                         # allowed
        "server/h.py": "import fedpriv\nfrom fedpriv import simulate\n",           # the API: upward
    })
    modules["fedpriv"] = tmp_path / "fedpriv_init.py"
    modules["fedpriv"].write_text("from fedpriv.simulations.d import X\n")
    graph = edges(modules)
    assert graph["client.b"] == {"server.c": 1}
    assert graph["common.a"] == {"client.b": 2}
    assert graph["server.c"] == {"simulations.d": 3}
    assert graph["simulations.d"] == {"simulations.e": 1}
    assert graph["simulations.pkg"] == {"simulations.pkg.f": 1}
    assert graph["client.g"] == {"common.a": 1}
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = layer_violations(graph, modules)
    finally:
        ROOT = saved
    assert [v.split(": ", 1)[1] for v in found] == [
        "client/ imports server.c (server/)",
        "common/ imports client.b (client/)",
        "server/ imports simulations.d (simulations/)",
        "server/ imports fedpriv (fedpriv/)",
    ]
    assert graph["fedpriv"] == {"simulations.d": 1}
    assert ["simulations.d", "simulations.e", "simulations.pkg.f"] in cycles(graph)
    assert bare_imports(ast.parse("import common.a\nfrom server import c\nimport fedpriv.client\nfrom . import x\n")) == [
        ("common.a", 1), ("server", 2)]
    tree = ast.parse("from ..pkg import f\nimport fedpriv.client.b as b\nfrom . import x\n")
    assert imported_modules(tree, "simulations.pkg.f", False) == [
        ("simulations.pkg", 1), ("client.b", 2), ("simulations.pkg", 3)]
