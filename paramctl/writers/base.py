"""What every writer shares: applying an :class:`Edit` to a record stream, and reading a
record's bytes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path

from paramctl.errors import SourceError, UsageError
from paramctl.io.files import read_exact
from paramctl.model import Edit, InitFn, TensorRecord

__all__ = ["Progress", "edited", "new_folder", "record_bytes", "source_gone"]

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

        buf = bytearray(record_bytes(record))
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
