"""Checkpoint formats behind one protocol; importing this package registers them all.

Each format is one reader module that calls :func:`~paramctl.sources.base.register`;
:func:`open_source` picks the first whose detector accepts the spec (after a folder holding
one weights file is resolved to that file: :mod:`paramctl.sources.folder`). Remote specs
(``https://``, ``hf://``) reach the same readers through :mod:`paramctl.io.hub`, which
registers their byte readers; ``hf://ORG/REPO`` is first resolved to its weights file.
"""

from __future__ import annotations

from paramctl.io import hub
from paramctl.sources import dcp, gguf, module, pt, safetensors, sharded, sharded_bin
from paramctl.sources.base import (
    Edit,
    FileSource,
    OpenOptions,
    Source,
    detect_format,
    openers,
)
from paramctl.sources.folder import resolve_folder

__all__ = [
    "Edit", "FileSource", "OpenOptions", "Source", "dcp", "gguf", "module", "open_source",
    "pt", "safetensors", "sharded", "sharded_bin",
]


def open_source(spec: str, options: OpenOptions | None = None) -> Source:
    """Open ``spec`` with the first format whose detector accepts it."""
    options = options or OpenOptions()
    spec = hub.resolve(spec)
    spec = resolve_folder(spec)
    fmt = detect_format(spec)
    for name, _, opener in openers():
        if name == fmt:
            return opener(spec, options)
    raise AssertionError(fmt)
