"""Checkpoint formats behind one protocol; importing this package registers them all."""

from __future__ import annotations

from paramctl.sources import sharded  # noqa: I001  (detectors run in import order)
from paramctl.sources import module, pt, safetensors
from paramctl.sources.base import Edit, OpenOptions, Source, open_source

__all__ = [
    "Edit", "OpenOptions", "Source", "module", "open_source", "pt", "safetensors", "sharded",
]
