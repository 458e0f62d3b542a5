"""Every rewrite goes through here: one writer module per output format, fed a stream of
:class:`~paramctl.model.TensorRecord`\\ s (or, for a same-format rewrite, the parsed source
it splices). Readers never import writers; writers never import readers (they take any
object with the attributes they need), and format modules never import one another except
that the sharded writer builds its shards with the single-file one.

Adding a writable format: one module here and one entry in :func:`write`'s dispatch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from paramctl.errors import OperationError, UsageError
from paramctl.formats import FROZEN_KEY, INDEX_SUFFIX, PT_EXTENSIONS
from paramctl.io.files import FdPool, check_rewritable, lock_wait, locked
from paramctl.model import FLOAT_DTYPES, Edit, TensorRecord
from paramctl.writers.base import Progress, edited, source_gone

__all__ = ["check_output_name", "check_writable", "output_kind", "write",
           "write_converted"]


def output_kind(out: Path) -> str:
    """``safetensors``, ``pt`` or ``folder`` for an ``-o`` path."""
    if out.suffix.lower() == ".safetensors":
        return "safetensors"
    if out.suffix.lower() in PT_EXTENSIONS:
        return "pt"
    if out.is_dir() or not out.suffix or str(out).endswith(os.sep):
        return "folder"
    raise OperationError(f"-o {out}: unknown output type; use .pt, .safetensors or a folder "
                         "(sharded safetensors)")


def check_output_name(spec: str, out: Path) -> None:
    """Refuse an ``-o`` of no known output type before ``spec`` is opened (reading a large
    header takes a while) unless it is named like ``spec``: a single-file source then
    decides the format (see :func:`_same_suffix`), once it is read."""
    if not (out.suffix and out.suffix.lower() == Path(spec).suffix.lower()):
        output_kind(out)


def check_writable(source: Any) -> None:
    """Refuse, before anything is planned, a source of a format no writer saves."""
    if source.format == "gguf":
        raise UsageError(f"{source.display}: GGUF files are read-only in paramctl; convert "
                         "with llama.cpp's tools, or list only")


_NATIVE = {"pt": "pt", "safetensors": "safetensors", "safetensors-sharded": "folder",
           "pt-sharded": "folder", "dcp": "folder"}


def _in_place_target(source: Any) -> Path | None:
    """The file an in-place rewrite of ``source`` replaces (for the checks before it)."""
    if source.format == "module":
        return None  # needs -o
    for attr in ("path", "index_path"):
        target = getattr(source, attr, None)
        if isinstance(target, Path):
            return target
    folder = getattr(source, "folder", None)
    return folder / ".metadata" if isinstance(folder, Path) else None


def write(source: Any, edit: Edit, out: Path | None, progress: Progress | None = None, *,
          force: bool = False, wait: float = 0.0) -> Path:
    """Apply ``edit`` to ``source`` and save it, in place (``out is None``) or to ``out``,
    atomically. A same-format write keeps everything the edit does not touch; another
    format streams the tensors one at a time (a conversion).

    Every write passes :func:`~paramctl.io.files.check_rewritable` first (a Hugging Face
    cache file is refused; a read-only file in place too, unless ``force``), and waits up
    to ``wait`` seconds for another paramctl's lock on the file."""
    if getattr(source, "remote", False):
        raise UsageError(f"{source.display}: remote sources are read-only; download first")
    check_writable(source)
    target = out if out is not None else _in_place_target(source)
    if target is not None:
        check_rewritable(target, in_place=out is None, force=force)
    with lock_wait(wait):
        return _write(source, edit, out, progress)


def _write(source: Any, edit: Edit, out: Path | None, progress: Progress | None) -> Path:
    fmt = source.format
    if fmt == "module":
        from paramctl.writers import module

        return module.rewrite(source, edit, out)
    kind = output_kind(out) if out is not None and not _same_suffix(source, out) \
        else _NATIVE[fmt]
    if getattr(source, "legacy", False):
        _check_legacy(source, out)
        return convert(source, edit, out or Path(), kind, progress)
    if kind == _NATIVE[fmt]:
        if fmt == "pt":
            from paramctl.writers import pt

            if source.unsafe:
                return pt.rewrite_unpickled(source, edit, out)
            return pt.rewrite(source, edit, out, progress)
        if fmt == "safetensors":
            from paramctl.writers import safetensors

            return safetensors.rewrite(source, edit, out, progress)
        if fmt == "safetensors-sharded":
            from paramctl.writers import sharded

            return sharded.rewrite(source, edit, out, progress)
        if fmt == "pt-sharded":
            from paramctl.writers import sharded_bin

            return sharded_bin.rewrite(source, edit, out, progress)
        from paramctl.writers import dcp

        return dcp.rewrite(source, edit, out, progress)
    return convert(source, edit, out or Path(), kind, progress)


def _same_suffix(source: Any, out: Path) -> bool:
    """``-o`` named like a single-file source (``ckpt.pth.tar`` -> ``new.pth.tar``, a
    ``.pkl`` found to be a torch zip by its content) is written in the source's format."""
    path = getattr(source, "path", None)
    return source.format in ("pt", "safetensors") and isinstance(path, Path) and \
        out.suffix != "" and out.suffix.lower() == path.suffix.lower()


def _check_legacy(source: Any, out: Path | None) -> None:
    if out is None:
        raise UsageError(
            f"{source.display} is a legacy (pre-1.6, non-zip) torch file, which paramctl "
            "does not rewrite in place; write a new checkpoint with -o OUT.pt (or -o "
            "OUT.safetensors)")


def _metadata(source: Any) -> dict[str, str]:
    """The safetensors ``__metadata__`` a conversion writes (paramctl's frozen list aside)."""
    if source.format == "safetensors":
        return {k: v for k, v in source.header.metadata.items() if k != FROZEN_KEY}
    if source.format == "safetensors-sharded":
        meta = source.index.get("metadata") or {}
        return {k: v for k, v in meta.items() if isinstance(v, str) and k != FROZEN_KEY}
    return {"format": "pt"}


def convert(source: Any, edit: Edit, out: Path, kind: str, progress: Progress | None = None
            ) -> Path:
    """Write ``source`` (with ``edit`` applied) as ``kind``, one tensor at a time."""
    if source.format == "pt" and (kind != "pt" or getattr(source, "legacy", False)) and \
            getattr(source, "key_path", None) and source.options.key is None:
        path = ".".join(source.key_path)
        raise UsageError(
            f"{source.display} holds more than a state dict (under {path!r}); the other "
            f"format stores only tensors, so the rest would be lost. Pass --key {path} to "
            "convert just the weights"
        )
    if kind == "folder" and edit.max_shard_size is None:
        raise UsageError(f"-o {out} is a folder: pass --max-shard-size (e.g. 5GB) to split "
                         "into sharded safetensors")
    with FdPool() as pool:
        records = source.records(pool)
        # Only floating-point tensors can be frozen; integer ones are never trainable.
        frozen = edit.frozen_after((r.name for r in records if r.frozen),
                                   (r.name for r in records if r.dtype in FLOAT_DTYPES))
        records = edited(records, edit, frozen)
        meta = _metadata(source)
        if kind == "safetensors":
            from paramctl.writers.safetensors import write_safetensors

            return write_safetensors(out, records, meta, progress)
        if kind == "pt":
            from paramctl.writers.pt import write_pt

            return write_pt(out, records, progress)
        from paramctl.writers.sharded import write_sharded

        assert edit.max_shard_size is not None
        return write_sharded(out, records, edit.max_shard_size, meta, progress)


def write_converted(source: Any,
                    make: Callable[[list[TensorRecord]], list[TensorRecord]],
                    out: Path | None, *, renames: Mapping[str, str], drops: set[str],
                    casts: set[str], edit: Edit | None = None,
                    max_shard_size: int | None = None, progress: Progress | None = None,
                    force: bool = False, wait: float = 0.0) -> Path:
    """Write ``source`` after ``convert``'s transforms, in place or to ``out``.

    A torch file written as a torch file keeps everything beside the tensors: renames and
    drops are spliced into its pickle (casts need a plain state dict, which is written
    afresh). Every other case streams ``make(source.records(pool))`` into the writer of
    the output's kind.
    """
    if getattr(source, "remote", False):
        raise UsageError("remote sources are read-only; download first")
    check_writable(source)
    target = out if out is not None else _in_place_target(source)
    if target is not None:
        check_rewritable(target, in_place=out is None, force=force)
    with lock_wait(wait):
        return _write_converted(source, make, out, renames=renames, drops=drops, casts=casts,
                                edit=edit or Edit(), max_shard_size=max_shard_size,
                                progress=progress)


def _write_converted(source: Any, make: Callable[[list[TensorRecord]], list[TensorRecord]],
                     out: Path | None, *, renames: Mapping[str, str], drops: set[str],
                     casts: set[str], edit: Edit, max_shard_size: int | None,
                     progress: Progress | None) -> Path:
    fmt = source.format
    kind = output_kind(out) if out is not None else _NATIVE[fmt]
    # A sharded source written as a folder without --max-shard-size keeps its shards.
    layout: dict[str, str] | None = None
    if kind == "folder" and max_shard_size is None:
        if fmt not in ("safetensors-sharded", "pt-sharded"):  # DCP: no layout to keep
            if out is None:
                raise UsageError(f"{source.display} is a folder: converting it in place is "
                                 "not supported; write a new one with -o NEW_FOLDER "
                                 "--max-shard-size SIZE, or one file with -o OUT.safetensors")
            raise UsageError(f"-o {out} is a folder: pass --max-shard-size (e.g. 5GB) to "
                             "write sharded safetensors")
        moved = drops or any(old != new for old, new in renames.items())
        if out is None and (fmt != "safetensors-sharded" or moved):
            what = "renaming or dropping tensors of" if moved else "converting"
            raise UsageError(
                f"{what} {source.display} in place cannot be done atomically (the index "
                "and the shards would change together); write a new folder with "
                "-o NEW_FOLDER (or one file with -o OUT.safetensors)")
        layout = source.weight_map
    if getattr(source, "legacy", False):
        _check_legacy(source, out)
    elif fmt == "pt" and kind == "pt" and not source.unsafe and not (casts and source.plain):
        if casts:
            raise UsageError(
                f"{source.display} holds more than a state dict; casting it would have to "
                "rewrite what is beside the tensors. Cast the weights alone with --key "
                f"{'.'.join(source.key_path) or 'KEY'} -o OUT.safetensors")
        from paramctl.writers import pt

        return pt.rewrite(source, edit, out, progress, renames=renames, drops=drops)
    if fmt == "pt" and (kind != "pt" or getattr(source, "legacy", False)) and \
            source.key_path and source.options.key is None:
        path = ".".join(source.key_path)
        raise UsageError(
            f"{source.display} holds more than a state dict (under {path!r}); the other "
            f"format stores only tensors, so the rest would be lost. Pass --key {path} to "
            "convert just the weights")
    in_place = out is None
    target = out if out is not None else (source.folder if layout else source.path)
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(FdPool())
        if in_place and layout is not None:
            stack.enter_context(locked(source.index_path))
        elif in_place:
            fd = stack.enter_context(locked(source.path, expect=source.identity))
            if fd is None:
                raise source_gone(source.display)
            pool.adopt(source.path, fd)
        records = source.records(pool)
        frozen = edit.frozen_after((r.name for r in records if r.frozen),
                                   (r.name for r in records if r.dtype in FLOAT_DTYPES))
        records = make(edited(records, edit, frozen))
        meta = {**_metadata(source), "format": "pt"}
        if kind == "safetensors":
            from paramctl.writers.safetensors import write_safetensors

            return write_safetensors(target, records, meta, progress,
                                     mode_from=source.path if in_place else None)
        if kind == "pt":
            from paramctl.writers.pt import write_pt

            return write_pt(target, records, progress)
        from paramctl.writers.sharded import write_sharded

        if layout is not None:
            old_name = {new: old for old, new in renames.items()}
            shard_of = {r.name: layout[old_name.get(r.name, r.name)] for r in records}
            index_name = (source.index_path.name if fmt == "safetensors-sharded"
                          else f"model{INDEX_SUFFIX}")
            # The shards keep their names when they are all safetensors files, all kept.
            same = fmt == "safetensors-sharded" and set(shard_of.values()) == set(layout.values())
            return write_sharded(target, records, None, meta, progress, shard_of=shard_of,
                                 keep_names=same, in_place=in_place, index_name=index_name)
        return write_sharded(target, records, max_shard_size, meta, progress)
