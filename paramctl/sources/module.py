"""Module paths: ``pkg.mod:attr`` or ``path/to/file.py:attr`` naming an ``nn.Module`` class,
a factory, or an instance. ``list`` builds it on the ``meta`` device (no weight memory)."""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from paramctl.errors import SourceError, UsageError
from paramctl.model import ParamInfo
from paramctl.sources import detect
from paramctl.sources.base import OpenOptions, register
from paramctl.sources.detect import is_module_path

if TYPE_CHECKING:
    from torch import nn

__all__ = ["ModuleSource", "build_module", "is_module_path", "parse_args"]

_SPEC = detect.MODULE_SPEC


def parse_args(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` strings -> kwargs; values are Python literals, else strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, eq, raw = pair.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise UsageError(f"--arg {pair!r}: expected key=value, e.g. --arg hidden=64")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            out[key] = raw
    return out


@contextlib.contextmanager
def _on_path(folder: str) -> Iterator[None]:
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)


def _import(target: str, spec: str) -> Any:
    if target.endswith(".py") or os.sep in target:
        path = Path(target)
        if not path.is_file():
            raise SourceError(f"cannot find module file {target} (from {spec!r})")
        name = "paramctl_user_" + re.sub(r"\W", "_", str(path.resolve()))
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise SourceError(f"cannot import {target}: not a Python file")
        mod = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = mod
        with _on_path(str(path.resolve().parent)), _on_path(os.getcwd()):
            loader_spec.loader.exec_module(mod)
        return mod
    with _on_path(os.getcwd()):
        return importlib.import_module(target)


def _resolve(spec: str) -> Any:
    match = _SPEC.match(spec)
    if match is None:
        raise SourceError(f"bad module path {spec!r}: expected pkg.module:attr or "
                          "path/to/file.py:attr")
    target, attr = match["target"], match["attr"]
    try:
        obj = _import(target, spec)
    except SourceError:
        raise
    except ModuleNotFoundError as exc:
        raise SourceError(f"cannot import {target!r}: {exc}") from None
    except Exception as exc:
        raise SourceError(f"importing {target!r} failed: {type(exc).__name__}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SourceError(f"{target!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def build_module(spec: str, args: Mapping[str, Any], *, meta: bool) -> nn.Module:
    """Import ``spec`` and return the module it names, built on ``meta`` if asked."""
    import torch
    from torch import nn

    obj = _resolve(spec)
    if isinstance(obj, nn.Module):
        if args:
            raise UsageError(f"{spec} is a module instance; --arg applies to classes and "
                             "factories")
        return obj
    if not callable(obj):
        raise SourceError(f"{spec} is a {type(obj).__name__}, not an nn.Module, class or "
                          "factory")
    device = torch.device("meta") if meta else torch.device("cpu")
    try:
        with device:
            built = obj(**args)
    except TypeError as exc:
        raise SourceError(f"calling {spec} failed: {exc} (pass keyword arguments with "
                          "--arg key=value)") from None
    except Exception as exc:
        raise SourceError(f"building {spec} failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(built, nn.Module):
        raise SourceError(f"{spec} returned a {type(built).__name__}, not an nn.Module")
    return built


class ModuleSource:
    """An ``nn.Module`` built from code; written back only with ``-o``."""

    format = "module"

    def __init__(self, spec: str, options: OpenOptions) -> None:
        self.display = spec
        self.spec = spec
        self.options = options
        self._module: nn.Module | None = None
        self._meta = True
        # Set by the core when --weights names a checkpoint: (module, assign, spec) -> None.
        # The loader opens another source, which a format module must not do itself.
        self.load_weights: Callable[[nn.Module, bool, str], None] | None = None

    def module(self, *, meta: bool = True) -> nn.Module:
        if self._module is None or (self._meta and not meta):
            built = build_module(self.spec, self.options.args,
                                 meta=meta and self.options.weights is None)
            if self.options.weights is not None:
                if self.load_weights is None:
                    raise SourceError("--weights needs paramctl.core.open_view to load it")
                self.load_weights(built, meta, self.spec)
            self._module, self._meta = built, meta
        return self._module

    def params(self) -> list[ParamInfo]:
        from paramctl.tensors import module_params

        return module_params(self.module(meta=True), buffers=self.options.buffers)

    def total_bytes(self) -> int:
        return sum(p.nbytes for p in self.params())


register("module", detect.module, ModuleSource)
