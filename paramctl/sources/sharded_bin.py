"""Sharded torch checkpoints (the older Hugging Face layout): ``pytorch_model.bin.index.json``
plus ``pytorch_model-00001-of-00002.bin`` shards, each a ``torch.save`` of a flat state dict.

Each shard is read by the torch zip reader (opened through the registry as format ``pt``,
so the restricted unpickler and every check it makes apply to it unchanged): its zip
directory and ``data.pkl``, never tensor data. As for sharded safetensors, the frozen state
lives in the index, ``metadata["paramctl.frozen"]``, so ``freeze``/``unfreeze`` rewrite one
small JSON file; ``init`` rewrites only the shards that hold selected tensors
(``writers/sharded_bin``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, cast

from paramctl.errors import CorruptFileError, SourceError
from paramctl.formats import BIN_INDEX_SUFFIX
from paramctl.formats.hf_index import find_index, index_frozen, read_index, uncopied_files
from paramctl.formats.zip import Record
from paramctl.io.files import FdPool, FileIdentity
from paramctl.io.reader import is_remote, join
from paramctl.model import FLOAT_DTYPES, Edit, ParamInfo, TensorRecord, mark_buffers
from paramctl.sources import detect
from paramctl.sources.base import OpenOptions, open_as, register

__all__ = ["ShardedBinSource"]


class TorchZipShard(Protocol):
    """What this reader (and the torch zip writer, for ``init``) use of one shard: the
    ``pt`` reader's source object."""

    display: str
    path: Path
    identity: FileIdentity | None
    file_size: int
    zip_records: list[Record]
    by_name: dict[str, Record]
    prefix: str
    pickle_record: Record
    pickle_bytes: bytes
    tensors: Mapping[str, Any]
    parsed: Any

    def params(self) -> list[ParamInfo]: ...
    def records(self, pool: FdPool) -> list[TensorRecord]: ...
    def load_tensors(self) -> dict[str, Any]: ...
    def _storage_record(self, ref: Any) -> Record: ...


class ShardedBinSource:
    format = "pt-sharded"

    def __init__(self, spec: str, options: OpenOptions) -> None:
        self.display = spec
        self.remote = is_remote(spec)
        if options.key:
            raise SourceError("--key applies to single torch checkpoints; the shards of a "
                              "sharded .bin each hold one flat state dict")
        index_spec = spec if self.remote else str(find_index(spec, BIN_INDEX_SUFFIX))
        self.index_spec = index_spec
        self.index_path = Path(index_spec)
        self.folder = self.index_path.parent
        self.base = index_spec.rsplit("/", 1)[0] if self.remote else str(self.folder)
        self.index = read_index(index_spec)
        self.weight_map: dict[str, str] = self.index["weight_map"]
        self.shards: dict[str, TorchZipShard] = dict(self._read_shards())
        self._params: dict[str, ParamInfo] = {}
        for shard, source in self.shards.items():
            held = {p.name: p for p in source.params()}
            for name, p in held.items():
                owner = self.weight_map.get(name)
                if owner is None:
                    raise CorruptFileError(f"{source.display}: tensor {name!r} is not in the "
                                           "index")
                if owner == shard:
                    self._params[name] = p
        for name, shard in self.weight_map.items():
            if name not in self._params:
                raise CorruptFileError(f"{self.index_path}: {name!r} is mapped to {shard}, "
                                       "which does not hold it")
        self.frozen = index_frozen(self.index, self.index_path)

    def _read_shards(self) -> list[tuple[str, TorchZipShard]]:
        names = list(dict.fromkeys(self.weight_map.values()))
        # Shards are plain state dicts: never the --unsafe-load fallback, never a --key.
        plain = OpenOptions()

        def read(shard: str) -> tuple[str, TorchZipShard]:
            spec = join(self.base, shard)
            if not self.remote and not os.path.isfile(spec):
                raise SourceError(f"{self.index_path}: shard {shard} is missing")
            return shard, cast(TorchZipShard, open_as("pt", spec, plain))

        if not self.remote or len(names) == 1:
            return [read(s) for s in names]
        # Remote shards: a few round trips each, so fetch them concurrently (bounded).
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
            return list(pool.map(read, names))

    def params(self) -> list[ParamInfo]:
        """Every tensor in index order; the index's frozen list says what is frozen."""
        out = []
        for name in self.weight_map:
            p = self._params[name]
            out.append(dataclasses.replace(
                p, requires_grad=p.dtype in FLOAT_DTYPES and name not in self.frozen))
        return mark_buffers(out)

    def total_bytes(self) -> int:
        return sum(s.file_size for s in self.shards.values())

    def new_frozen(self, edit: Edit) -> set[str]:
        return edit.frozen_after(self.frozen, self.weight_map)

    def shard_path(self, shard: str) -> Path:
        return self.folder / shard

    def records(self, pool: FdPool) -> list[TensorRecord]:
        """Every tensor, in index order, as byte ranges of its shard's records."""
        by_name: dict[str, TensorRecord] = {}
        for shard, source in self.shards.items():
            for r in source.records(pool):
                if self.weight_map.get(r.name) == shard:
                    by_name[r.name] = dataclasses.replace(
                        r, frozen=r.name in self.frozen and r.dtype in FLOAT_DTYPES)
        return [by_name[name] for name in self.weight_map]

    def load_tensors(self) -> dict[str, Any]:
        """Every tensor, shard by shard, through torch's own loader (weights_only)."""
        out: dict[str, Any] = {}
        for source in self.shards.values():
            out.update(source.load_tensors())
        return {name: out[name] for name in self.weight_map}

    def conversion_warnings(self, out: Path) -> list[str]:
        if self.remote:
            return []  # remote sources are never written; the write says so
        return uncopied_files(self.folder, self.index_path, self.shards, out)


register("pt-sharded", detect.sharded_bin, ShardedBinSource)
