"""Rewrite torch.distributed.checkpoint (DCP) folders.

Flags live in the sidecar ``.paramctl.json``; ``init`` loads the tensors through
``torch.distributed.checkpoint.load``, initialises the selected ones and saves through
``torch.distributed.checkpoint.save`` into a temporary folder that is swapped in atomically
(``renameat2(RENAME_EXCHANGE)``). Non-tensor entries are carried as their stored bytes.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Protocol

from paramctl.errors import UsageError
from paramctl.formats import DCP_FROZEN_FILE, DCP_METADATA
from paramctl.io.files import TEMP_MARK, atomic_write, copy_range, locked
from paramctl.model import Edit
from paramctl.tensors import dist_info, no_dist
from paramctl.writers.base import Progress

__all__ = ["rewrite"]

FROZEN_FILE = DCP_FROZEN_FILE
METADATA = DCP_METADATA


class DcpLike(Protocol):
    display: str
    folder: Path
    meta: Any

    def new_frozen(self, edit: Edit) -> set[str]: ...
    def load_named(self, names: list[str]) -> dict[str, Any]: ...
    def raw_bytes(self, name: str) -> bytes: ...


def _frozen_doc(frozen: set[str]) -> bytes:
    return (json.dumps({"frozen": sorted(frozen)}, indent=2) + "\n").encode()


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return bool(rc == 0)


def rewrite(source: DcpLike, edit: Edit, out: Path | None, progress: Progress | None = None
            ) -> Path:
    """Apply ``edit`` to a DCP folder in place, or write the result as folder ``out``."""
    frozen = source.new_frozen(edit)
    if not edit.init:
        if out is None:
            with atomic_write(source.folder / FROZEN_FILE) as fh:
                fh.write(_frozen_doc(frozen))
            return source.folder
        _copy_folder(source, out, progress)
        with atomic_write(out / FROZEN_FILE) as fh:
            fh.write(_frozen_doc(frozen))
        return out
    return _reinit(source, edit, frozen, out)


def _copy_folder(source: DcpLike, out: Path, progress: Progress | None) -> None:
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"-o {out} exists and is not empty; name a new folder")
    out.mkdir(parents=True, exist_ok=True)
    for entry in sorted(source.folder.iterdir()):
        if entry.is_file() and entry.name != FROZEN_FILE and TEMP_MARK not in entry.name:
            with open(entry, "rb") as fin, atomic_write(out / entry.name,
                                                        mode_from=entry) as fh:
                copy_range(fin.fileno(), fh.fileno(), 0, entry.stat().st_size, progress)


def _carry_other_files(source: DcpLike, tmp: Path) -> None:
    """Copy what DCP does not own (a config, notes, subfolders) into the new folder."""
    import shutil

    owned = {METADATA, FROZEN_FILE} | {rel for rel, _, _, _ in source.meta.storage.values()}
    for entry in source.folder.iterdir():
        if entry.name in owned or TEMP_MARK in entry.name or (tmp / entry.name).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, tmp / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, tmp / entry.name, follow_symlinks=False)



def _reinit(source: DcpLike, edit: Edit, frozen: set[str], out: Path | None) -> Path:
    import shutil
    import tempfile
    import warnings

    import torch.distributed.checkpoint as dcp

    dist = dist_info()
    if out is not None and out.exists() and any(out.iterdir()) and dist.rank == 0:
        raise UsageError(f"-o {out} exists and is not empty; name a new folder")
    state: dict[str, Any] = source.load_named([e.name for e in source.meta.tensors])
    for name in sorted(edit.init):
        if edit.init_fn is None:
            raise AssertionError("init without init_fn")
        edit.init_fn(name, state[name])
    for name in source.meta.byte_entries:
        state[name] = _RawBytes(source.raw_bytes(name))
    parent = (out or source.folder).resolve().parent
    target = (out or source.folder).resolve()
    tmp = Path(dist.shared(lambda: tempfile.mkdtemp(
        prefix=f".{target.name}{TEMP_MARK}", suffix=".tmp", dir=parent)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(state, checkpoint_id=str(tmp),  # type: ignore[attr-defined]
                     no_dist=no_dist(),
                     planner=_raw_bytes_planner())
        dist.barrier()
        if dist.rank == 0:
            (tmp / FROZEN_FILE).write_bytes(_frozen_doc(frozen))
            if out is None:
                _carry_other_files(source, tmp)
                os.chmod(tmp, source.folder.stat().st_mode & 0o7777)
            else:
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o777 & ~umask)
            _fsync_tree(tmp)
            if out is not None:
                if target.exists():
                    target.rmdir()  # checked empty above
                os.replace(tmp, target)
            else:
                with locked(source.folder / METADATA):
                    if not _exchange(tmp, target):
                        backup = parent / f".{target.name}{TEMP_MARK}old.tmp"
                        os.replace(target, backup)
                        os.replace(tmp, target)
                        tmp = backup
                shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
    except BaseException:
        if dist.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.close()
    return target



class _RawBytes(io.BytesIO):
    """A non-tensor entry's stored bytes, written back as they are (never unpickled)."""


def _raw_bytes_planner() -> Any:
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    class RawBytesPlanner(DefaultSavePlanner):
        def transform_object(self, write_item: Any, obj: Any) -> Any:
            if isinstance(obj, _RawBytes):
                return obj
            return super().transform_object(write_item, obj)

    return RawBytesPlanner()


def _fsync_tree(folder: Path) -> None:
    import contextlib

    for entry in folder.iterdir():
        with contextlib.suppress(OSError), open(entry, "rb") as fh:
            os.fsync(fh.fileno())
