"""Checkpoint formats behind one protocol.

Each format is one reader module that calls :func:`~paramctl.sources.base.register`;
:func:`open_source` picks the first whose detector accepts the spec, after a folder holding
one weights file is resolved to that file (:mod:`paramctl.sources.folder`) and
``hf://ORG/REPO`` to its weights file (:mod:`paramctl.io.hub`, which also registers the
remote byte readers). The formats are listed here, in detection order, with their
detectors (:mod:`paramctl.sources.detect`): a reader module is imported only when a spec is
opened with it, so listing a safetensors file never loads the pickle machinery of the torch
reader.
"""

from __future__ import annotations

import importlib
from typing import Any

from paramctl.io import hub
from paramctl.sources import detect
from paramctl.sources.base import (
    Edit,
    FileSource,
    OpenOptions,
    Source,
    detect_format,
    openers,
    register_lazy,
)

__all__ = [
    "Edit", "FileSource", "OpenOptions", "Source", "dcp", "gguf", "module", "open_source",
    "pt", "safetensors", "sharded", "sharded_bin",
]

_READERS = ("dcp", "gguf", "module", "pt", "safetensors", "sharded", "sharded_bin")

register_lazy("dcp", detect.dcp, "paramctl.sources.dcp")
register_lazy("gguf", detect.gguf, "paramctl.sources.gguf")
register_lazy("module", detect.module, "paramctl.sources.module")
register_lazy("pt", detect.pt, "paramctl.sources.pt")
register_lazy("safetensors", detect.safetensors, "paramctl.sources.safetensors")
register_lazy("safetensors-sharded", detect.sharded, "paramctl.sources.sharded")
register_lazy("pt-sharded", detect.sharded_bin, "paramctl.sources.sharded_bin")


def __getattr__(name: str) -> Any:
    """``paramctl.sources.pt`` and the others, imported on first use."""
    if name in _READERS:
        return importlib.import_module(f"paramctl.sources.{name}")
    raise AttributeError(f"module 'paramctl.sources' has no attribute {name!r}")


def open_source(spec: str, options: OpenOptions | None = None) -> Source:
    """Open ``spec`` with the first format whose detector accepts it."""
    from paramctl.sources.folder import resolve_folder

    options = options or OpenOptions()
    spec = hub.resolve(spec)
    spec = resolve_folder(spec)
    fmt = detect_format(spec)
    for name, _, opener in openers():
        if name == fmt:
            return opener(spec, options)
    raise AssertionError(fmt)
