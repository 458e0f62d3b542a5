"""The names ``paramctl`` exports stay what ``__all__`` promises.

``paramctl/__init__.py`` resolves its public names lazily (``__getattr__`` and ``_LAZY``).
Importing a submodule sets an attribute of the same name on the package, so a module file
``paramctl/select.py`` replaced the function ``paramctl.select`` as soon as anything
imported it. These tests keep every public name clear of submodules.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import types
from pathlib import Path

import paramctl

PACKAGE = Path(paramctl.__file__).resolve().parent


def top_level_names() -> dict[str, Path]:
    """Every name a module or package file claims in the ``paramctl`` namespace, found by
    walking the whole tree (a package ``paramctl/x/`` claims ``x`` through any file in it)."""
    found: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        first = path.relative_to(PACKAGE).parts[0]
        name = first.removesuffix(".py")
        if name != "__init__" and name != "__main__":
            found.setdefault(name, path)
    return found


def test_no_module_is_named_like_a_public_name() -> None:
    clashes = {name: str(path) for name, path in top_level_names().items()
               if name in paramctl.__all__}
    assert clashes == {}


def test_every_lazy_name_is_exported_and_resolves() -> None:
    lazy = paramctl._LAZY
    assert set(lazy) <= set(paramctl.__all__)
    assert set(paramctl.__all__) - set(lazy) == {"__version__"}
    for name in paramctl.__all__:
        value = getattr(paramctl, name)
        assert not isinstance(value, types.ModuleType), name
        if name in lazy:
            assert value is getattr(importlib.import_module(lazy[name]), name)


# Runs in a fresh interpreter so that the order is the one that used to break: first
# touch every public name, then import every submodule, then look again.
_PROBE = """
import importlib, pkgutil, sys, types
import paramctl
from paramctl.patterns import select as select_fn
before = {name: getattr(paramctl, name) for name in paramctl.__all__}
for info in pkgutil.walk_packages(paramctl.__path__, "paramctl."):
    if info.name != "paramctl.__main__":
        importlib.import_module(info.name)
bad = [name for name in paramctl.__all__
       if isinstance(getattr(paramctl, name), types.ModuleType)
       or getattr(paramctl, name) is not before[name]]
print("select-is-function", paramctl.select is select_fn)
print("shadowed", sorted(bad))
"""


def test_importing_every_submodule_shadows_no_public_name() -> None:
    repo = PACKAGE.parent
    res = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                         cwd=repo, env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"},
                         timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "select-is-function True" in lines
    assert "shadowed []" in lines


def test_select_is_the_function() -> None:
    import paramctl.patterns

    assert callable(paramctl.select)
    assert paramctl.select is paramctl.patterns.select
    assert paramctl.select(["a.w", "b.w"], ["a"]) == ["a.w"]
