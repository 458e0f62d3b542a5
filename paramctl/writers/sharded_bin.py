"""Write sharded torch checkpoints (``pytorch_model.bin.index.json`` + ``.bin`` shards).

Flags live in the index, so ``freeze``/``unfreeze`` rewrite one small JSON file and never a
shard. ``init`` rewrites only the shards holding selected tensors, each atomically through
the torch zip writer (only the initialised storage records change), then the index last.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from paramctl.model import Edit
from paramctl.writers import pt
from paramctl.writers.base import Progress, rewrite_shards

__all__ = ["rewrite"]


class ShardedBinLike(Protocol):
    display: str
    index_path: Path
    folder: Path
    index: dict[str, Any]
    weight_map: dict[str, str]
    frozen: set[str]
    shards: Mapping[str, Any]  # shard file -> the torch zip reader's source (pt.PtLike)

    def new_frozen(self, edit: Edit) -> set[str]: ...


def rewrite(source: ShardedBinLike, edit: Edit, out: Path | None,
            progress: Progress | None = None) -> Path:
    """Apply ``edit`` in place, or write the result as a new folder ``out``."""
    frozen = source.new_frozen(edit)

    def rewrite_shard(shard: str, shard_edit: Edit, target: Path | None) -> None:
        pt.rewrite(source.shards[shard], shard_edit, target, progress)

    return rewrite_shards(source.folder, source.index_path, source.index, source.weight_map,
                          frozen, frozen != source.frozen, edit, out, progress, rewrite_shard)
