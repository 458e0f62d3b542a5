"""Write sharded safetensors folders (the Hugging Face layout): index + shards.

Flags live in the index, so ``freeze``/``unfreeze`` rewrite one small JSON file. ``init``
rewrites only the shards holding selected tensors, each atomically, then the index last.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from paramctl.formats import FROZEN_KEY, INDEX_SUFFIX
from paramctl.formats.safetensors import Header
from paramctl.io.files import FileIdentity, atomic_write
from paramctl.model import Edit, TensorRecord
from paramctl.writers.base import Progress, new_folder, rewrite_shards
from paramctl.writers.safetensors import rewrite_file, write_safetensors

__all__ = ["new_folder", "rewrite", "write_sharded"]


class ShardedLike(Protocol):
    display: str
    index_path: Path
    folder: Path
    index: dict[str, Any]
    weight_map: dict[str, str]
    headers: dict[str, Header]
    sizes: dict[str, int]
    identities: dict[str, FileIdentity | None]
    frozen: set[str]

    def new_frozen(self, edit: Edit) -> set[str]: ...


def rewrite(source: ShardedLike, edit: Edit, out: Path | None,
            progress: Progress | None = None) -> Path:
    """Apply ``edit`` in place, or write the result as a new folder ``out``."""
    frozen = source.new_frozen(edit)

    def rewrite_shard(shard: str, shard_edit: Edit, target: Path | None) -> None:
        header = source.headers[shard]
        rewrite_file(source.folder / shard, header, source.identities[shard], shard_edit,
                     header.frozen, target, progress)

    return rewrite_shards(source.folder, source.index_path, source.index, source.weight_map,
                          frozen, frozen != source.frozen, edit, out, progress, rewrite_shard)


def write_sharded(out_dir: Path, records: Sequence[TensorRecord], max_shard_size: int,
                  metadata: dict[str, str], progress: Progress | None = None) -> Path:
    """Split ``records`` into shards of at most ``max_shard_size`` bytes (a tensor larger
    than that gets a shard of its own) and write them with an index, Hugging Face style."""
    groups: list[list[TensorRecord]] = [[]]
    size = 0
    for r in records:
        if groups[-1] and size + r.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(r)
        size += r.nbytes
    new_folder(out_dir)
    n = len(groups)
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups, start=1):
        shard = f"model-{i:05d}-of-{n:05d}.safetensors"
        not_frozen = [dataclasses.replace(r, frozen=False) for r in group]
        write_safetensors(out_dir / shard, not_frozen, dict(metadata), progress)
        for r in group:
            weight_map[r.name] = shard
    frozen = sorted(r.name for r in records if r.frozen)
    meta: dict[str, Any] = {"total_size": sum(r.nbytes for r in records)}
    if frozen:
        meta[FROZEN_KEY] = frozen
    index = out_dir / f"model{INDEX_SUFFIX}"
    with atomic_write(index) as fh:
        fh.write((json.dumps({"metadata": meta, "weight_map": weight_map}, indent=2)
                  + "\n").encode())
    return out_dir
