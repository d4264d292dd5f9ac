"""The import graph of ``lightning_local`` has no cycle, and the layers point one way.

Nodes are the modules of the package, found with :mod:`pkgutil` from its folder (nothing is
imported); a package is the node of its ``__init__.py``. Edges come from parsing every module
with :mod:`ast`: each ``import lightning_local.x`` and ``from lightning_local.x import y``
(relative imports resolved), at module level and inside functions and classes, except those
under ``if TYPE_CHECKING:`` (they never run). ``from a import b`` is an edge to ``a.b`` when that
is a module, otherwise to ``a``. Importing ``a.b.c`` also runs the ``__init__`` of the packages
on the way, so the edge ``m -> a.b.c`` comes with ``m -> a.b``, unless ``a.b`` is a package that
``m`` itself lies in (Python has started that one before ``m`` runs). Imports made from strings
(``importlib.import_module``: the lazy exports of ``lightning_local`` and
``lightning_local.diagnostics``, the command line's subcommand table) are not seen.

Edges from a package's ``__init__`` to its own submodules are kept like every other edge: the
graph must be acyclic with them.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

import lightning_local

ROOT = "lightning_local"
DIAGNOSTICS = f"{ROOT}.diagnostics"


# ------------------------------------------------------------------------- the checker
def module_files(folder: Path = Path(lightning_local.__file__).parent,
                 package: str = ROOT) -> dict[str, tuple[Path, bool]]:
    """``{module name: (file, is_package)}`` of ``package`` and everything below it."""
    found = {package: (folder / "__init__.py", True)}
    for info in pkgutil.iter_modules([str(folder)]):
        name = f"{package}.{info.name}"
        if info.ispkg:
            found.update(module_files(folder / info.name, name))
        else:
            found[name] = (folder / f"{info.name}.py", False)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Imports(ast.NodeVisitor):
    """Every import statement's targets, skipping ``if TYPE_CHECKING:`` blocks."""

    def __init__(self, module: str, is_package: bool, known: set[str]) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.known = known
        self.targets: set[str] = set()

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            parts = self.package.split(".")
            parent = ".".join(parts[: len(parts) - node.level + 1])
            base = f"{parent}.{base}" if base else parent
        for alias in node.names:
            candidate = f"{base}.{alias.name}"
            self._add(candidate if candidate in self.known else base)

    def _add(self, name: str) -> None:
        if name != ROOT and not name.startswith(f"{ROOT}."):
            return
        while name not in self.known:  # e.g. a name that is no module: its nearest module
            name = name.rpartition(".")[0]
        self.targets.add(name)


def imports_of(source: str, module: str, is_package: bool, known: Iterable[str]) -> set[str]:
    """The ``lightning_local`` modules that ``source`` (the module ``module``) imports."""
    visitor = _Imports(module, is_package, set(known))
    visitor.visit(ast.parse(source))
    visitor.targets.discard(module)
    return visitor.targets


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, set[str]]:
    """``{module: modules whose import it runs}``, explicit imports plus the packages on the way."""
    files = module_files()
    graph = {}
    for module, (path, is_package) in files.items():
        targets = imports_of(path.read_text(encoding="utf-8"), module, is_package, files)
        own = set(_ancestors(module))
        implied = {p for t in targets for p in _ancestors(t) if p not in own and p != module}
        graph[module] = targets | implied
    return graph


def explicit_imports() -> dict[str, set[str]]:
    """``{module: modules named in its import statements}`` (no packages on the way)."""
    files = module_files()
    return {
        module: imports_of(path.read_text(encoding="utf-8"), module, is_package, files)
        for module, (path, is_package) in files.items()
    }


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One cycle ``[a, b, .., a]`` of a directed graph, or ``None`` when it is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def reachable(graph: Mapping[str, Iterable[str]], start: str) -> set[str]:
    """Every module that importing ``start`` may import (``start`` excluded)."""
    seen, todo = set(), [start]
    while todo:
        for target in graph.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    seen.discard(start)
    return seen


# ------------------------------------------------------------------------- the checker works
def test_find_cycle_detects_a_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"a"}}) is None


def test_the_parser_sees_function_imports_resolves_modules_and_skips_type_checking():
    known = {ROOT, f"{ROOT}.p", f"{ROOT}.p.m", f"{ROOT}.p.n", f"{ROOT}.q", f"{ROOT}.t"}
    source = (
        "from typing import TYPE_CHECKING\n"
        "import os\n"
        "from lightning_local.p import m, some_function\n"
        "if TYPE_CHECKING:\n"
        "    from lightning_local.t import Thing\n"
        "else:\n"
        "    pass\n"
        "def f():\n"
        "    import lightning_local.q\n"
        "    from . import n\n"
    )
    targets = imports_of(source, f"{ROOT}.p.x", False, known)
    assert targets == {f"{ROOT}.p.m", f"{ROOT}.p", f"{ROOT}.q", f"{ROOT}.p.n"}


def test_the_graph_covers_the_package():
    graph = import_graph()
    assert {f"{DIAGNOSTICS}.alignment", f"{ROOT}.rules.target_propagation", ROOT} <= set(graph)
    assert f"{DIAGNOSTICS}.best_lr" in graph[f"{ROOT}.sweeps.results"]
    assert DIAGNOSTICS in graph[f"{ROOT}.sweeps.results"]  # the package on the way


# ------------------------------------------------------------------------- the package
def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_rules_import_only_the_pure_parts_of_diagnostics():
    allowed = {f"{DIAGNOSTICS}.alignment", f"{DIAGNOSTICS}.measures"}
    for module, targets in explicit_imports().items():
        if module == f"{ROOT}.rules" or module.startswith(f"{ROOT}.rules."):
            used = {t for t in targets if t == DIAGNOSTICS or t.startswith(f"{DIAGNOSTICS}.")}
            assert used <= allowed, (module, sorted(used - allowed))


@pytest.mark.parametrize("module", ["alignment", "measures"])
def test_what_rules_may_import_imports_no_rule(module):
    below = reachable(import_graph(), f"{DIAGNOSTICS}.{module}")
    assert not {m for m in below if m.startswith(f"{ROOT}.rules")}, sorted(below)


def test_diagnostics_do_not_import_the_sweeps_except_the_coordinate_check():
    """The sweeps import diagnostics (best lr, figures), never the reverse; the coordinate
    check alone builds its runs with :mod:`lightning_local.sweeps.experiment`."""
    graph = explicit_imports()
    for module, targets in graph.items():
        if module.startswith(f"{DIAGNOSTICS}.") and module != f"{DIAGNOSTICS}.coord_check":
            assert not {t for t in targets if t.startswith(f"{ROOT}.sweeps")}, module
    assert not {m for m in reachable(import_graph(), f"{DIAGNOSTICS}.plots")
                if m.startswith(f"{ROOT}.sweeps")}


def test_shims_import_from_diagnostics_and_diagnostics_never_from_shims():
    shims = {f"{ROOT}.{name}" for name in (
        "callbacks", "callbacks.coord_check", "callbacks.local_update_alignment",
        "callbacks.run_config", "coord_check", "plots", "loggers", "analysis",
        "analysis.deep_linear",
    )}
    graph = explicit_imports()
    for shim in shims:
        assert graph[shim] and all(t.startswith(f"{DIAGNOSTICS}.") for t in graph[shim]), shim
    for module, targets in graph.items():
        if module.startswith(DIAGNOSTICS):
            assert not targets & shims, (module, sorted(targets & shims))


# ------------------------------------------------------------------------- the old paths
OLD_PATHS = {
    "callbacks": ("callbacks", ["CoordCheckCallback", "LocalUpdateAlignment", "LogRunConfig",
                                "base_shape_table", "local_update_cosines", "run_config"]),
    "callbacks.coord_check": ("callbacks", ["CoordCheckCallback"]),
    "callbacks.local_update_alignment": ("callbacks", ["LocalUpdateAlignment",
                                                       "local_update_cosines"]),
    "callbacks.run_config": ("callbacks", ["LogRunConfig", "base_shape_table", "run_config"]),
    "coord_check": ("coord_check", ["QUANTITIES", "CoordCheckResult", "coord_check", "main",
                                    "variant_family"]),
    "plots": ("plots", ["plot_coord_check", "plot_transfer"]),
    "loggers": ("loggers", ["add_wandb_arguments", "command_wandb_run", "log_figure",
                            "log_table", "make_wandb_logger"]),
    "analysis": ("deep_linear", ["compare_updates", "linear_equilibrium", "pc_gram_matrix",
                                 "layer_cosines", "LinearEquilibrium", "UpdateComparison"]),
    "analysis.deep_linear": ("deep_linear", ["compare_updates", "gd_gradients",
                                             "gnt_gradients", "pc_gradients"]),
}


@pytest.mark.parametrize("old", sorted(OLD_PATHS))
def test_old_import_paths_give_the_diagnostics_objects(old):
    new, names = OLD_PATHS[old]
    shim = importlib.import_module(f"{ROOT}.{old}")
    module = importlib.import_module(f"{DIAGNOSTICS}.{new}")
    for name in names:
        assert getattr(shim, name) is getattr(module, name), name
    assert set(names) <= set(shim.__all__)


def test_old_measurement_paths_and_sweep_results_reexport_the_diagnostics():
    from lightning_local import coord_check
    from lightning_local.diagnostics import best_lr, measures
    from lightning_local.sweeps import results

    for name in ("fit_slope", "forward_rms", "pc_rms", "snapshot", "tp_rms", "weight_update_rms"):
        assert getattr(coord_check, name) is getattr(measures, name)
    for name in ("METRICS", "BestLR", "best_learning_rates"):
        assert getattr(results, name) is getattr(best_lr, name)


def test_diagnostics_exports_resolve_lazily():
    import lightning_local.diagnostics as diagnostics

    assert sorted(diagnostics.__all__) == sorted(diagnostics._EXPORTS)
    for name in diagnostics.__all__:
        module = importlib.import_module(diagnostics._EXPORTS[name])
        assert getattr(diagnostics, name) is getattr(module, name)
    with pytest.raises(AttributeError, match="no attribute"):
        diagnostics.NotAThing  # noqa: B018
