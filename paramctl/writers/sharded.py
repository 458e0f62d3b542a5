"""Write sharded safetensors folders (the Hugging Face layout): index + shards.

Flags live in the index, so ``freeze``/``unfreeze`` rewrite one small JSON file. ``init``
rewrites only the shards holding selected tensors, each atomically, then the index last.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
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


def write_sharded(out_dir: Path, records: Sequence[TensorRecord], max_shard_size: int | None,
                  metadata: dict[str, str], progress: Progress | None = None, *,
                  shard_of: Mapping[str, str] | None = None, keep_names: bool = False,
                  in_place: bool = False, index_name: str = f"model{INDEX_SUFFIX}") -> Path:
    """Write ``records`` as shards with an index, Hugging Face style.

    Shards of at most ``max_shard_size`` bytes (a tensor larger than that gets a shard of
    its own), or, with ``shard_of`` (record name -> the shard it was read from), the
    source's own shards: each tensor stays in its shard; the shards are numbered afresh
    unless ``keep_names``. ``in_place``: ``out_dir`` is that source folder; each shard is
    replaced atomically, then the index (only casts do this: no name changes files).
    """
    if shard_of is None:
        assert max_shard_size is not None
        groups: list[list[TensorRecord]] = [[]]
        size = 0
        for r in records:
            if groups[-1] and size + r.nbytes > max_shard_size:
                groups.append([])
                size = 0
            groups[-1].append(r)
            size += r.nbytes
        names: list[str] = []
    else:
        by_shard: dict[str, list[TensorRecord]] = {}
        for r in records:
            by_shard.setdefault(shard_of[r.name], []).append(r)
        groups = list(by_shard.values())
        names = list(by_shard) if keep_names or in_place else []
    if not in_place:
        new_folder(out_dir)
    n = len(groups)
    names = names or [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    weight_map: dict[str, str] = {}
    for shard, group in zip(names, groups, strict=True):
        not_frozen = [dataclasses.replace(r, frozen=False) for r in group]
        path = out_dir / shard
        path.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(path, not_frozen, dict(metadata), progress,
                          mode_from=path if in_place else None)
        for r in group:
            weight_map[r.name] = shard
    frozen = sorted(r.name for r in records if r.frozen)
    meta: dict[str, Any] = {"total_size": sum(r.nbytes for r in records)}
    if frozen:
        meta[FROZEN_KEY] = frozen
    index = out_dir / index_name
    with atomic_write(index, mode_from=index if in_place else None) as fh:
        fh.write((json.dumps({"metadata": meta, "weight_map": weight_map}, indent=2)
                  + "\n").encode())
    return out_dir
