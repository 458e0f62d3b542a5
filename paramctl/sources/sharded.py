"""Sharded safetensors (the Hugging Face layout): ``*.safetensors.index.json`` + shards.

``list`` reads the index and each shard's header, nothing else. The frozen state lives in
the index, ``metadata["paramctl.frozen"]`` (a JSON array of names), so ``freeze`` and
``unfreeze`` rewrite one small JSON file and never touch tensor data (``writers/sharded``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from paramctl.errors import CorruptFileError, SourceError
from paramctl.formats import INDEX_SUFFIX
from paramctl.formats.hf_index import find_index as _find_index
from paramctl.formats.hf_index import index_frozen, read_index, uncopied_files
from paramctl.formats.safetensors import Header, TensorEntry, header_records, read_header
from paramctl.io.files import FdPool, FileIdentity
from paramctl.io.reader import LocalReader, is_remote, join, open_reader
from paramctl.model import FLOAT_DTYPES, Edit, ParamInfo, TensorRecord, mark_buffers
from paramctl.sources import detect
from paramctl.sources.base import OpenOptions, local_only, register

__all__ = ["INDEX_SUFFIX", "ShardedSource"]

# Remote shard headers fetched at once: each costs a round trip, so they overlap. 16, not
# DESIGN's "about 8": with 50 ms a request, 160 shards take 1.5 s at 8 (over the contract's
# 0.5 x huggingface_hub), 0.94 s at 16 and no less at 32 (benchmarks/run.py, "list remote
# shards"); 16 connections is what huggingface_hub itself opens on a 12-core machine.
REMOTE_FETCHES = 16


def find_index(spec: str) -> Path:
    return _find_index(spec, INDEX_SUFFIX)


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
        self.index = read_index(index_spec)
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
                    raise CorruptFileError(f"{self.index_spec}: {name!r} is mapped to {shard}, "
                                           "which does not hold it")
        self.frozen = self._frozen()

    def _frozen(self) -> set[str]:
        return index_frozen(self.index, self.index_spec)

    def params(self) -> list[ParamInfo]:
        out = []
        for name in self.weight_map:
            e = self.entries[name]
            out.append(ParamInfo(name=name, shape=e.shape, dtype=e.dtype, numel=e.numel,
                                 nbytes=e.end - e.begin,
                                 requires_grad=e.dtype in FLOAT_DTYPES and name not in self.frozen))
        return mark_buffers(out)

    def total_bytes(self) -> int:
        return sum(self.sizes.values())

    def new_frozen(self, edit: Edit) -> set[str]:
        return edit.frozen_after(self.frozen, self.weight_map)

    def conversion_warnings(self, out: Path) -> list[str]:
        if self.remote:
            return []  # remote sources are never written; the write says so
        return uncopied_files(self.folder, self.index_path, self.headers, out)

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

        pool = ThreadPoolExecutor(max_workers=min(REMOTE_FETCHES, len(shards)))
        try:
            futures = [pool.submit(read, s) for s in shards]
            return [f.result() for f in futures]
        finally:
            # After a failure, do not fetch (and retry) the shards still queued.
            pool.shutdown(wait=True, cancel_futures=True)

    def shard_path(self, shard: str) -> Path:
        return self.folder / shard

    def records(self, pool: FdPool) -> list[TensorRecord]:
        """Every tensor, in index order, as byte ranges of its shard."""
        local_only(self.display, self.remote)
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

        local_only(self.display, self.remote)
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
