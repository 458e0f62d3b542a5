"""What every writer shares: applying an :class:`Edit` to a record stream, and reading a
record's bytes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from paramctl.errors import SourceError, UsageError
from paramctl.formats.hf_index import index_doc
from paramctl.io.files import atomic_write, copy_range, locked, read_exact
from paramctl.model import Edit, InitFn, TensorRecord

__all__ = ["Progress", "edited", "new_folder", "record_bytes", "rewrite_shards",
           "source_gone"]

Progress = Callable[[int], None]


def record_bytes(record: TensorRecord) -> bytes | bytearray:
    """The record's bytes in memory (one tensor at a time, never the model)."""
    if record.load is not None:
        data = record.load()
        if len(data) != record.nbytes:
            raise AssertionError(f"{record.name}: {len(data)} bytes, expected {record.nbytes}")
        return data
    if record.fd is None:
        raise AssertionError(f"record {record.name} has no data")
    return read_exact(record.fd, record.nbytes, record.offset, repr(record.name))


def _initialised(record: TensorRecord, init_fn: InitFn) -> Callable[[], bytearray]:
    def load() -> bytearray:
        from paramctl.tensors import frombuffer

        # Every init function overwrites the whole tensor: the stored bytes are not read.
        buf = bytearray(record.nbytes)
        init_fn(record.name, frombuffer(buf, record.dtype).view(record.shape))
        return buf

    return load


def edited(records: Iterable[TensorRecord], edit: Edit, frozen: set[str]
           ) -> list[TensorRecord]:
    """``records`` with the frozen set applied and ``edit.init`` tensors re-initialised
    on the way out (each loaded, initialised and released one at a time)."""
    out = []
    for r in records:
        if r.frozen != (r.name in frozen):  # most keep their flag: no copy for those
            r = dataclasses.replace(r, frozen=not r.frozen)
        if r.name in edit.init:
            if edit.init_fn is None:
                raise AssertionError("init without init_fn")
            r = dataclasses.replace(r, fd=None, load=_initialised(r, edit.init_fn))
        out.append(r)
    return out


def source_gone(display: str) -> SourceError:
    return SourceError(f"{display} disappeared while paramctl was reading it")


def new_folder(out: Path) -> None:
    """``-o FOLDER`` must be new or empty: never mix shards of two checkpoints."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"-o {out} exists and is not an empty folder; name a new folder")
    out.mkdir(parents=True, exist_ok=True)


def rewrite_shards(folder: Path, index_path: Path, index: dict[str, Any],
                   weight_map: Mapping[str, str], frozen: set[str], changed_flags: bool,
                   edit: Edit, out: Path | None, progress: Progress | None,
                   rewrite_shard: Callable[[str, Edit, Path | None], None]) -> Path:
    """The shared plan of both sharded layouts (safetensors and torch ``.bin``): flags live
    in the index, so only the shards holding ``edit.init`` tensors are rewritten (each by
    ``rewrite_shard(shard, its edit, its output or None)``, atomically), then the index
    last, and only when the flags changed. With ``out``, a new folder: the other shards
    are copied in the kernel."""
    touched = {weight_map[n] for n in edit.init}
    shards = list(dict.fromkeys(weight_map.values()))

    def shard_edit(shard: str) -> Edit:
        return Edit(init=frozenset(n for n in edit.init if weight_map[n] == shard),
                    init_fn=edit.init_fn)

    if out is None:
        with locked(index_path):
            for shard in shards:
                if shard in touched:
                    rewrite_shard(shard, shard_edit(shard), None)
            if changed_flags:
                with atomic_write(index_path) as fh:
                    fh.write(index_doc(index, frozen))
        return index_path
    if out.resolve() == folder.resolve():
        raise UsageError(f"-o {out} is the source folder; omit -o to rewrite in place")
    new_folder(out)
    for shard in shards:
        src = folder / shard
        (out / shard).parent.mkdir(parents=True, exist_ok=True)
        if shard in touched:
            rewrite_shard(shard, shard_edit(shard), out / shard)
        else:
            with open(src, "rb") as fin, atomic_write(out / shard, mode_from=src) as fh:
                copy_range(fin.fileno(), fh.fileno(), 0, src.stat().st_size, progress)
    with atomic_write(out / index_path.name, mode_from=index_path) as fh:
        fh.write(index_doc(index, frozen))
    return out
