"""Checkpoint formats behind one protocol; importing this package registers them all.

Each format is one reader module that calls :func:`~paramctl.sources.base.register`;
:func:`open_source` picks the first whose detector accepts the spec.
"""

from __future__ import annotations

from paramctl.sources import dcp, gguf, module, pt, safetensors, sharded
from paramctl.sources.base import (
    Edit,
    FileSource,
    OpenOptions,
    Source,
    detect_format,
    openers,
)

__all__ = [
    "Edit", "FileSource", "OpenOptions", "Source", "dcp", "gguf", "module", "open_source",
    "pt", "safetensors", "sharded",
]


def open_source(spec: str, options: OpenOptions | None = None) -> Source:
    """Open ``spec`` with the first format whose detector accepts it."""
    options = options or OpenOptions()
    fmt = detect_format(spec)
    for name, _, opener in openers():
        if name == fmt:
            return opener(spec, options)
    raise AssertionError(fmt)
