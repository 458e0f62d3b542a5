"""The Hugging Face shard index (``*.safetensors.index.json``, ``*.bin.index.json``):
``{"metadata": {...}, "weight_map": {name: shard file}}``.

paramctl keeps the frozen state of a sharded checkpoint in the index's
``metadata["paramctl.frozen"]`` (a JSON array of names), so a freeze rewrites this one small
file. Shared by the sharded readers and writers of both shard formats.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from paramctl.errors import CorruptFileError, SourceError
from paramctl.formats import FROZEN_KEY, recorded_frozen
from paramctl.io.reader import open_reader

__all__ = ["MAX_INDEX_BYTES", "find_index", "index_doc", "index_frozen", "read_index",
           "uncopied_files"]

MAX_INDEX_BYTES = 256 << 20


def find_index(spec: str, suffix: str) -> Path:
    """``spec`` itself, or the one ``*suffix`` file in the folder ``spec``."""
    path = Path(spec)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.name.lower().endswith(suffix))
        if not found:
            raise SourceError(f"{spec}: no *{suffix} in this folder")
        if len(found) > 1:
            raise SourceError(f"{spec}: several index files ({', '.join(p.name for p in found)});"
                              " name one")
        return found[0]
    return path


def read_index(spec: str) -> dict[str, Any]:
    """The index document, validated: a ``weight_map`` of names to shard files inside the
    folder, and an optional ``metadata`` object."""
    reader = open_reader(spec)
    try:
        if reader.size > MAX_INDEX_BYTES:
            raise CorruptFileError(f"{spec}: index file is implausibly large")
        raw = reader.pread(reader.size, 0)
    finally:
        reader.close()
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptFileError(f"{spec}: not a valid index file ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict):
        raise CorruptFileError(f"{spec}: index has no 'weight_map' object")
    wm = doc["weight_map"]
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise CorruptFileError(f"{spec}: 'weight_map' must map names to shard file names")
    for shard in set(wm.values()):
        if os.path.isabs(shard) or ".." in Path(shard).parts:
            raise CorruptFileError(f"{spec}: shard {shard!r} points outside the folder")
    meta = doc.get("metadata", {})
    if meta is not None and not isinstance(meta, dict):
        raise CorruptFileError(f"{spec}: 'metadata' must be an object")
    return doc


def index_frozen(index: dict[str, Any], where: object) -> set[str]:
    """The names ``metadata["paramctl.frozen"]`` records (a JSON array, or a string holding
    one); ``where`` names the index in messages."""
    return recorded_frozen(index.get("metadata") or {}, f"{where}: metadata")


def index_doc(index: dict[str, Any], frozen: set[str],
              weight_map: dict[str, str] | None = None) -> bytes:
    """The index bytes with ``frozen`` recorded (and, optionally, a new ``weight_map``);
    every other key is kept."""
    doc = dict(index)
    meta = dict(doc.get("metadata") or {})
    meta.pop(FROZEN_KEY, None)
    if frozen:
        meta[FROZEN_KEY] = sorted(frozen)
    doc["metadata"] = meta
    if weight_map is not None:
        doc["weight_map"] = weight_map
    return (json.dumps(doc, indent=2) + "\n").encode()


def uncopied_files(folder: Path, index_path: Path, shards: Iterable[str], out: Path
                   ) -> list[str]:
    """The warning a folder -> new folder write gives about files it does not copy
    (a config, a tokenizer...): only the shards and the index are written."""
    known = set(shards)
    extra = sorted(p.name for p in folder.iterdir()
                   if p.is_file() and p.name not in known
                   and p != index_path and not p.name.startswith("."))
    if extra and out.suffix == "":
        return [f"only the shards and the index are written to {out}; other files in "
                f"{folder} ({', '.join(extra[:4])}{', ...' if len(extra) > 4 else ''})"
                " are not copied"]
    return []
