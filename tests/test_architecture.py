"""The import graph of ``paramctl/`` follows DESIGN's layers and has no cycle.

Walks every module with :mod:`ast`, counting lazy imports inside functions too, so a
cycle or a layer breach cannot hide behind a function-level import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "paramctl"


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:`` (never imported at run time)."""
    out: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        out.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return out


def _imports(path: Path, name: str, modules: set[str] | None = None) -> set[str]:
    """What ``name`` imports at run time (lazy imports included). ``from pkg import sub``
    counts as importing ``pkg.sub`` alone when ``sub`` is a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = {f"{mod}.{alias.name}" for alias in node.names}
            if modules is not None and subs <= modules:
                out.update(subs)
            else:
                out.add(mod)
                out.update(subs & (modules or set()))
    return out


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path, name, set(modules))
                       if m in modules and m != name}
    return graph


def _all_imports() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p, _module_name(p)) for p in PKG.rglob("*.py")}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _package_of(module: str) -> str:
    """``paramctl.sources.pt`` -> ``sources``; ``paramctl.core`` -> ``core``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycle() -> None:
    # A package's __init__ importing its own submodules is not a cycle worth flagging
    # only when the submodules do not import the package back; Tarjan sees both edges.
    assert _cycles(_graph()) == []


# Which layers each layer may import (besides itself). Pure data modules (errors, model)
# and the torch helpers (tensors) sit at the bottom and may be used from anywhere below cli.
_BOTTOM = {"errors", "model", "tensors"}
ALLOWED: dict[str, set[str]] = {
    "io": {"errors"},
    "formats": {"io", "errors", "model"},
    "sources": {"formats", "io", "select", "rules", *_BOTTOM},
    "writers": {"formats", "io", *_BOTTOM},
    "numeric": {"errors"},
    "select": {"errors"},
    "patterns": {"errors"},
    "rules": {"errors", "select", "patterns", "model", "tensors"},
    "memory": {*_BOTTOM},
    "render": {*_BOTTOM, "memory", "numeric"},
    "weights": {"sources", *_BOTTOM},
    "view": {"sources", "weights", *_BOTTOM},
    "values": {"view", "sources", "numeric", "select", "patterns", "io", *_BOTTOM},
    "surgery": {"view", "sources", "writers", "numeric", "rules", "select", "patterns", "io",
                *_BOTTOM},
    "core": {"sources", "writers", "numeric", "rules", "select", "patterns", "io", "formats",
             "memory", "weights", "view", "surgery", *_BOTTOM},
    "api": {"core", "sources", "writers", "rules", "select", "patterns", "io", "weights",
            "surgery", "values", *_BOTTOM},
    "cli": {"core", "render", "sources", "rules", "select", "patterns", "errors", "model",
            "memory", "io", "surgery", "values", "fastcli", ""},
    # The entry point and `list` without Typer (start-up time): cli's Typer-free half.
    "fastcli": {"core", "render", "sources", "errors", "model", "io"},
    "errors": set(),
    "model": set(),
    "tensors": {"model", "errors"},
    "lightning": {"api", "sources", *_BOTTOM},
    "__main__": {"cli", "fastcli"},
    "": {"errors", "model", "core", "api", "sources", "select", "patterns", "memory",
         "surgery", "values"},
}


def test_imports_follow_the_layers() -> None:
    breaches = []
    for module, deps in _graph().items():
        layer = _package_of(module)
        for dep in deps:
            target = _package_of(dep)
            if target == layer:
                continue
            if target not in ALLOWED.get(layer, set()):
                breaches.append(f"{module} -> {dep}")
    assert breaches == []


def test_readers_never_import_writers_or_each_other() -> None:
    # Shared building blocks, not formats: any reader may use them.
    helpers = {"paramctl.sources", "paramctl.sources.base", "paramctl.sources.pickle_vm",
               "paramctl.sources.pickled_module", "paramctl.sources.pt_legacy",
               "paramctl.sources.statedict", "paramctl.sources.adapter",
               "paramctl.sources.detect"}
    graph = _graph()
    bad = []
    for module, deps in graph.items():
        if not module.startswith("paramctl.sources.") or module in helpers:
            continue
        for dep in deps:
            if dep.startswith("paramctl.writers") or (
                    dep.startswith("paramctl.sources.") and dep not in helpers):
                bad.append(f"{module} -> {dep}")
    assert bad == []


def test_writers_never_import_readers() -> None:
    bad = [f"{m} -> {d}" for m, deps in _graph().items() if m.startswith("paramctl.writers")
           for d in deps if d.startswith("paramctl.sources")]
    assert bad == []


def test_rich_only_in_render_text_and_typer_only_in_cli() -> None:
    bad = []
    for module, deps in _all_imports().items():
        for dep in deps:
            top = dep.split(".")[0]
            if top == "rich" and module != "paramctl.render.text":
                bad.append(f"{module} -> {dep}")
            if top in ("typer", "click") and not module.startswith("paramctl.cli"):
                bad.append(f"{module} -> {dep}")
    assert bad == []


def test_torch_is_never_imported_at_module_level() -> None:
    bad = []
    for path in PKG.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            if any(n.split(".")[0] in ("torch", "safetensors") for n in names):
                bad.append(str(path.relative_to(REPO)))
    assert bad == []


@pytest.mark.parametrize("module", sorted(
    _module_name(p) for p in (PKG / "sources").glob("*.py") if p.name != "__init__.py"))
def test_each_reader_imports_without_any_writer(module: str) -> None:
    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            "bad = [m for m in sys.modules if m.startswith('paramctl.writers')]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert proc.returncode == 0, proc.stderr


def test_the_checker_sees_a_cycle() -> None:
    """The cycle finder itself works (so a green run means something)."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
