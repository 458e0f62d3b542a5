"""Write sharded torch checkpoints (``pytorch_model.bin.index.json`` + ``.bin`` shards).

Flags live in the index, so ``freeze``/``unfreeze`` rewrite one small JSON file and never a
shard. ``init`` rewrites only the shards holding selected tensors, each atomically through
the torch zip writer (only the initialised storage records change), then the index last.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from paramctl.errors import UsageError
from paramctl.formats.hf_index import index_doc
from paramctl.io.files import atomic_write, copy_range, locked
from paramctl.model import Edit
from paramctl.writers import pt
from paramctl.writers.base import Progress, new_folder

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


def _shard_edit(source: ShardedBinLike, edit: Edit, shard: str) -> Edit:
    """Only the inits of one shard; its flags are the index's business."""
    return Edit(init=frozenset(n for n in edit.init if source.weight_map[n] == shard),
                init_fn=edit.init_fn)


def rewrite(source: ShardedBinLike, edit: Edit, out: Path | None,
            progress: Progress | None = None) -> Path:
    """Apply ``edit`` in place, or write the result as a new folder ``out``."""
    frozen = source.new_frozen(edit)
    touched = {source.weight_map[n] for n in edit.init}
    shards = list(dict.fromkeys(source.weight_map.values()))
    if out is None:
        with locked(source.index_path):
            for shard in shards:
                if shard in touched:
                    pt.rewrite(source.shards[shard], _shard_edit(source, edit, shard), None,
                               progress)
            if frozen != source.frozen:
                with atomic_write(source.index_path) as fh:
                    fh.write(index_doc(source.index, frozen))
        return source.index_path
    if out.resolve() == source.folder.resolve():
        raise UsageError(f"-o {out} is the source folder; omit -o to rewrite in place")
    new_folder(out)
    for shard in shards:
        src = source.folder / shard
        (out / shard).parent.mkdir(parents=True, exist_ok=True)
        if shard in touched:
            pt.rewrite(source.shards[shard], _shard_edit(source, edit, shard), out / shard,
                       progress)
        else:
            with open(src, "rb") as fin, atomic_write(out / shard, mode_from=src) as fh:
                copy_range(fin.fileno(), fh.fileno(), 0, src.stat().st_size, progress)
    with atomic_write(out / source.index_path.name, mode_from=source.index_path) as fh:
        fh.write(index_doc(source.index, frozen))
    return out
