"""Checkpoint formats behind one protocol; importing this package registers them all."""

from __future__ import annotations

from paramctl.sources import dcp, module, pt, safetensors, sharded
from paramctl.sources.base import Edit, OpenOptions, Source, open_source

__all__ = [
    "Edit", "OpenOptions", "Source", "dcp", "module", "open_source", "pt", "safetensors",
    "sharded",
]
