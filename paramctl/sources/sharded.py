"""Sharded safetensors (the Hugging Face layout): ``*.safetensors.index.json`` + shards.

``list`` reads the index and each shard's header, nothing else. The frozen state lives in
the index, ``metadata["paramctl.frozen"]`` (a JSON array of names), so ``freeze`` and
``unfreeze`` rewrite one small JSON file and never touch tensor data (``writers/sharded``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from paramctl.errors import CorruptFileError, SourceError
from paramctl.formats import FROZEN_KEY, INDEX_SUFFIX
from paramctl.formats.safetensors import Header, TensorEntry, header_records, read_header
from paramctl.io.files import FdPool, FileIdentity
from paramctl.io.reader import LocalReader, is_remote, join, open_reader
from paramctl.model import FLOAT_DTYPES, Edit, ParamInfo, TensorRecord
from paramctl.sources import detect
from paramctl.sources.base import OpenOptions, register

__all__ = ["INDEX_SUFFIX", "ShardedSource"]

MAX_INDEX_BYTES = 256 << 20


def find_index(spec: str) -> Path:
    path = Path(spec)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.name.endswith(INDEX_SUFFIX))
        if not found:
            raise SourceError(f"{spec}: no *{INDEX_SUFFIX} in this folder")
        if len(found) > 1:
            raise SourceError(f"{spec}: several index files ({', '.join(p.name for p in found)});"
                              " name one")
        return found[0]
    return path


def _read_index(spec: str) -> dict[str, Any]:
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


class ShardedSource:
    format = "safetensors-sharded"

    def __init__(self, spec: str, options: OpenOptions) -> None:
        self.display = spec
        self.remote = is_remote(spec)
        index_spec = spec if self.remote else str(find_index(spec))
        self.index_spec = index_spec
        self.index_path = Path(index_spec)
        self.folder = self.index_path.parent
        self.base = index_spec.rsplit("/", 1)[0] if self.remote else str(self.folder)
        if options.key:
            raise SourceError("--key applies to torch checkpoints")
        self.index = _read_index(index_spec)
        self.weight_map: dict[str, str] = self.index["weight_map"]
        self.headers: dict[str, Header] = {}
        self.sizes: dict[str, int] = {}
        self.identities: dict[str, FileIdentity | None] = {}
        for shard, header, size, identity in self._read_shards():
            self.headers[shard] = header
            self.sizes[shard] = size
            self.identities[shard] = identity
        self.entries: dict[str, TensorEntry] = {}
        for shard, header in self.headers.items():
            names = {e.name for e in header.tensors}
            for e in header.tensors:
                owner = self.weight_map.get(e.name)
                if owner is None:
                    raise CorruptFileError(f"{shard}: tensor {e.name!r} is not in the index")
                if owner == shard:
                    self.entries[e.name] = e
            for name, owner in self.weight_map.items():
                if owner == shard and name not in names:
                    raise CorruptFileError(f"{self.index_path}: {name!r} is mapped to {shard}, "
                                           "which does not hold it")
        self.frozen = self._frozen()

    def _frozen(self) -> set[str]:
        meta = self.index.get("metadata") or {}
        raw = meta.get(FROZEN_KEY)
        if raw is None:
            return set()
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except ValueError:
                raw = None
        if not isinstance(raw, list) or not all(isinstance(n, str) for n in raw):
            raise CorruptFileError(f"{self.index_path}: metadata[{FROZEN_KEY!r}] is not a list "
                                   "of names")
        return set(raw)

    def params(self) -> list[ParamInfo]:
        out = []
        for name in self.weight_map:
            e = self.entries[name]
            out.append(ParamInfo(name=name, shape=e.shape, dtype=e.dtype, numel=e.numel,
                                 nbytes=e.end - e.begin,
                                 requires_grad=e.dtype in FLOAT_DTYPES and name not in self.frozen))
        return out

    def total_bytes(self) -> int:
        return sum(self.sizes.values())

    def new_frozen(self, edit: Edit) -> set[str]:
        return edit.frozen_after(self.frozen, self.weight_map)

    def conversion_warnings(self, out: Path) -> list[str]:
        extra = sorted(p.name for p in self.folder.iterdir()
                       if p.is_file() and p.name not in self.headers
                       and p != self.index_path and not p.name.startswith("."))
        if extra and out.suffix == "":
            return [f"only the shards and the index are written to {out}; other files in "
                    f"{self.folder} ({', '.join(extra[:4])}{', ...' if len(extra) > 4 else ''})"
                    " are not copied"]
        return []

    def _read_shards(self) -> list[tuple[str, Header, int, FileIdentity | None]]:
        shards = list(dict.fromkeys(self.weight_map.values()))

        def read(shard: str) -> tuple[str, Header, int, FileIdentity | None]:
            spec = join(self.base, shard)
            if not self.remote and not os.path.isfile(spec):
                raise SourceError(f"{self.index_path}: shard {shard} is missing")
            reader = open_reader(spec)
            try:
                identity = reader.identity if isinstance(reader, LocalReader) else None
                return shard, read_header(reader), reader.size, identity
            finally:
                reader.close()

        if not self.remote or len(shards) == 1:
            return [read(s) for s in shards]
        # Remote headers: a round trip each, so fetch them concurrently (bounded).
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(8, len(shards))) as pool:
            return list(pool.map(read, shards))

    def shard_path(self, shard: str) -> Path:
        return self.folder / shard

    def records(self, pool: FdPool) -> list[TensorRecord]:
        """Every tensor, in index order, as byte ranges of its shard."""
        by_name: dict[str, TensorRecord] = {}
        for shard, header in self.headers.items():
            fd = pool.get(self.shard_path(shard))
            for r in header_records(fd, header, self.frozen):
                if self.weight_map.get(r.name) == shard:
                    by_name[r.name] = r
        return [by_name[name] for name in self.weight_map]

    def load_tensors(self) -> dict[str, Any]:
        """Every tensor, shard by shard, through safetensors' own loader."""
        from safetensors.torch import load_file

        out: dict[str, Any] = {}
        for shard in dict.fromkeys(self.weight_map.values()):
            try:
                out.update(load_file(str(self.shard_path(shard))))
            except Exception as exc:  # the Rust loader raises its own error type
                raise CorruptFileError(f"{self.shard_path(shard)}: {exc}") from None
        return {name: out[name] for name in self.weight_map}

    def entry(self, name: str) -> TensorEntry:
        return self.entries[name]


register("safetensors-sharded", detect.sharded, ShardedSource)
