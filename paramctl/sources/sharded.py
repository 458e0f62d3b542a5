"""Sharded safetensors (the Hugging Face layout): ``*.safetensors.index.json`` + shards.

``list`` reads the index and each shard's header, nothing else. The frozen state lives in
the index, ``metadata["paramctl.frozen"]`` (a JSON array of names), so ``freeze`` and
``unfreeze`` rewrite one small JSON file and never touch tensor data. ``init`` rewrites
only the shards holding selected tensors, each atomically, then the index. ``-o`` names a
new folder, or a single ``.safetensors``/``.pt`` file to merge into.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from paramctl.errors import CorruptFileError, SourceError, UsageError
from paramctl.fileio import atomic_write, copy_range, locked
from paramctl.model import FLOAT_DTYPES, ParamInfo
from paramctl.sources.base import Edit, OpenOptions, register
from paramctl.sources.pt import open_file
from paramctl.sources.safetensors import (
    FROZEN_KEY,
    Header,
    SafetensorsSource,
    TensorEntry,
    read_header,
)

__all__ = ["INDEX_SUFFIX", "ShardedSource", "write_sharded"]

INDEX_SUFFIX = ".safetensors.index.json"
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


def _read_index(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_INDEX_BYTES:
            raise CorruptFileError(f"{path}: index file is implausibly large")
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptFileError(f"{path}: not a valid index file ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict):
        raise CorruptFileError(f"{path}: index has no 'weight_map' object")
    wm = doc["weight_map"]
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise CorruptFileError(f"{path}: 'weight_map' must map names to shard file names")
    for shard in set(wm.values()):
        if os.path.isabs(shard) or ".." in Path(shard).parts:
            raise CorruptFileError(f"{path}: shard {shard!r} points outside the folder")
    meta = doc.get("metadata", {})
    if meta is not None and not isinstance(meta, dict):
        raise CorruptFileError(f"{path}: 'metadata' must be an object")
    return doc


class ShardedSource:
    format = "safetensors-sharded"

    def __init__(self, spec: str, options: OpenOptions) -> None:
        self.display = spec
        self.index_path = find_index(spec)
        self.folder = self.index_path.parent
        if options.key:
            raise SourceError("--key applies to torch checkpoints")
        self.index = _read_index(self.index_path)
        self.weight_map: dict[str, str] = self.index["weight_map"]
        self.headers: dict[str, Header] = {}
        self.sizes: dict[str, int] = {}
        for shard in dict.fromkeys(self.weight_map.values()):
            path = self.folder / shard
            if not path.is_file():
                raise SourceError(f"{self.index_path}: shard {shard} is missing")
            fd, size = open_file(str(path))
            try:
                self.headers[shard] = read_header(fd, str(path), size)
            finally:
                os.close(fd)
            self.sizes[shard] = size
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

    def _index_doc(self, frozen: set[str], weight_map: dict[str, str] | None = None
                   ) -> bytes:
        doc = dict(self.index)
        meta = dict(doc.get("metadata") or {})
        meta.pop(FROZEN_KEY, None)
        if frozen:
            meta[FROZEN_KEY] = sorted(frozen)
        doc["metadata"] = meta
        if weight_map is not None:
            doc["weight_map"] = weight_map
        return (json.dumps(doc, indent=2) + "\n").encode()

    def write(self, edit: Edit, out: Path | None,
              progress: Callable[[int], None] | None = None) -> Path:
        frozen = self.new_frozen(edit)
        if out is not None and out.suffix in (".safetensors", ".pt", ".pth", ".bin", ".ckpt"):
            return self._merge(edit, frozen, out, progress)
        touched = {self.weight_map[n] for n in edit.init}
        if out is None:
            with locked(self.index_path):
                for shard in dict.fromkeys(self.weight_map.values()):
                    if shard in touched:
                        self._shard_source(shard).write(self._shard_edit(edit, shard), None,
                                                        progress)
                with atomic_write(self.index_path) as fh:
                    fh.write(self._index_doc(frozen))
            return self.index_path
        if out.resolve() == self.folder.resolve():
            raise UsageError(f"-o {out} is the source folder; omit -o to rewrite in place")
        _new_folder(out)
        for shard in dict.fromkeys(self.weight_map.values()):
            if shard in touched:
                self._shard_source(shard).write(self._shard_edit(edit, shard), out / shard,
                                                progress)
            else:
                src = self.folder / shard
                (out / shard).parent.mkdir(parents=True, exist_ok=True)
                with open(src, "rb") as fin, atomic_write(out / shard, mode_from=src) as fh:
                    copy_range(fin.fileno(), fh.fileno(), 0, self.sizes[shard], progress)
        index_out = out / self.index_path.name
        with atomic_write(index_out, mode_from=self.index_path) as fh:
            fh.write(self._index_doc(frozen))
        return out

    def conversion_warnings(self, out: Path) -> list[str]:
        extra = sorted(p.name for p in self.folder.iterdir()
                       if p.is_file() and p.name not in self.headers
                       and p != self.index_path and not p.name.startswith("."))
        if extra and out.suffix == "":
            return [f"only the shards and the index are written to {out}; other files in "
                    f"{self.folder} ({', '.join(extra[:4])}{', ...' if len(extra) > 4 else ''})"
                    " are not copied"]
        return []

    def load_tensors(self) -> dict[str, Any]:
        """Every tensor, shard by shard, through safetensors' own loader."""
        out: dict[str, Any] = {}
        for shard in dict.fromkeys(self.weight_map.values()):
            out.update(self._shard_source(shard).load_tensors())
        return {name: out[name] for name in self.weight_map}

    def _shard_source(self, shard: str) -> SafetensorsSource:
        return SafetensorsSource(str(self.folder / shard), OpenOptions())

    def _shard_edit(self, edit: Edit, shard: str) -> Edit:
        names = {e.name for e in self.headers[shard].tensors}
        return Edit(init=frozenset(n for n in edit.init if n in names), init_fn=edit.init_fn)

    def _merge(self, edit: Edit, frozen: set[str], out: Path,
               progress: Callable[[int], None] | None) -> Path:
        from paramctl.convert import TensorSpec, write_pt, write_safetensors

        fds: dict[str, int] = {}
        try:
            specs = []
            for name in self.weight_map:
                shard = self.weight_map[name]
                if shard not in fds:
                    fds[shard] = os.open(self.folder / shard, os.O_RDONLY)
                e = self.entries[name]
                header = self.headers[shard]
                if name in edit.init:
                    source = self._shard_source(shard)
                    specs.append(TensorSpec(name, e.dtype, e.shape, name in frozen,
                                            e.end - e.begin,
                                            load=_initialise(source, fds[shard], e, edit)))
                else:
                    specs.append(TensorSpec(name, e.dtype, e.shape, name in frozen,
                                            e.end - e.begin, fds[shard],
                                            header.data_start + e.begin))
            if out.suffix == ".safetensors":
                meta = {k: v for k, v in (self.index.get("metadata") or {}).items()
                        if isinstance(v, str) and k != FROZEN_KEY}
                return write_safetensors(out, specs, meta, progress)
            return write_pt(out, specs, progress)
        finally:
            for fd in fds.values():
                os.close(fd)


def _new_folder(out: Path) -> None:
    """``-o FOLDER`` must be new or empty: never mix shards of two checkpoints."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"-o {out} exists and is not an empty folder; name a new folder")
    out.mkdir(parents=True, exist_ok=True)


def _initialise(source: SafetensorsSource, fd: int, entry: TensorEntry, edit: Edit
                ) -> Callable[[], bytearray]:
    return lambda: source._initialised(fd, entry, edit)


def write_sharded(out_dir: Path, specs: Sequence[Any], max_shard_size: int,
                  metadata: dict[str, str], progress: Callable[[int], None] | None = None
                  ) -> Path:
    """Split ``specs`` into shards of at most ``max_shard_size`` bytes (a tensor larger than
    that gets a shard of its own) and write them with an index, Hugging Face style."""
    from paramctl.convert import write_safetensors

    groups: list[list[Any]] = [[]]
    size = 0
    for s in specs:
        if groups[-1] and size + s.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(s)
        size += s.nbytes
    _new_folder(out_dir)
    n = len(groups)
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups, start=1):
        shard = f"model-{i:05d}-of-{n:05d}.safetensors"
        not_frozen = [dataclasses.replace(s, frozen=False) for s in group]
        write_safetensors(out_dir / shard, not_frozen, dict(metadata), progress)
        for s in group:
            weight_map[s.name] = shard
    frozen = sorted(s.name for s in specs if s.frozen)
    meta: dict[str, Any] = {"total_size": sum(s.nbytes for s in specs)}
    if frozen:
        meta[FROZEN_KEY] = frozen
    index = out_dir / f"model{INDEX_SUFFIX}"
    with atomic_write(index) as fh:
        fh.write((json.dumps({"metadata": meta, "weight_map": weight_map}, indent=2)
                  + "\n").encode())
    return out_dir


def _detect(spec: str) -> bool:
    if spec.endswith(INDEX_SUFFIX):
        return True
    path = Path(spec)
    return path.is_dir() and any(p.name.endswith(INDEX_SUFFIX) for p in path.iterdir())


register("safetensors-sharded", _detect, ShardedSource)
