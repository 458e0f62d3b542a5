"""Write ``.safetensors`` files from a record stream, streaming one tensor at a time."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

from paramctl.formats.safetensors import (
    FROZEN_KEY,
    Header,
    TensorEntry,
    encode_header,
    frozen_metadata,
    header_records,
    splice_metadata,
)
from paramctl.io.files import (
    FileIdentity,
    Prefill,
    atomic_write,
    copy_range,
    copy_range_at,
    locked,
    pwrite_all,
    start_worker,
    take_prefill,
    write_all,
    write_pieces,
)
from paramctl.model import STREAM_HOLD, Edit, TensorRecord
from paramctl.writers.base import Progress, edited, record_bytes, source_gone

__all__ = ["rewrite", "rewrite_file", "write_safetensors"]


def _entries(records: Sequence[TensorRecord]) -> list[TensorEntry]:
    entries = []
    cursor = 0
    for r in records:
        entries.append(TensorEntry(r.name, r.dtype, r.shape, cursor, cursor + r.nbytes))
        cursor += r.nbytes
    return entries


def _same_layout(entries: list[TensorEntry], header: Header) -> bool:
    # Entries are tuples (name, dtype, shape, begin, end): compared whole, in C.
    return sorted(header.tensors, key=lambda e: e.begin) == entries


def write_safetensors(out: Path, records: Sequence[TensorRecord], metadata: dict[str, str],
                      progress: Progress | None = None, *, keep: Header | None = None,
                      mode_from: Path | None = None) -> Path:
    """Write ``records`` (in order) as one safetensors file, atomically.

    ``metadata`` is the ``__metadata__`` without paramctl's frozen list, which comes from
    the records' flags. ``keep``: the header the records were read from, reused byte for
    byte when nothing in it changes. Consecutive byte ranges of one input file are copied
    as one in-kernel copy.
    """
    entries = _entries(records)
    frozen = {r.name for r in records if r.frozen}
    meta = frozen_metadata(metadata, frozen)
    same = keep is not None and _same_layout(entries, keep)
    reuse = keep is not None and same and keep.metadata == meta
    if keep is not None and reuse:
        header = len(keep.raw).to_bytes(8, "little") + keep.raw
    else:
        # Same layout: keep the header's own entry order (only the metadata changes).
        header = encode_header(keep.tensors if keep is not None and same else entries, meta)
    prefill = _prefilled(out, header, records, entries) if reuse else None
    if prefill is not None:
        try:
            return _write_over_prefill(out, mode_from, prefill, header, records, entries,
                                       progress)
        except _StalePrefill:
            pass  # the source changed under the copy: write afresh (and the lock decides)
    with atomic_write(out, mode_from=mode_from) as fh:
        fd = fh.fileno()
        write_all(fd, header)
        if any(r.load is not None for r in records) and any(r.load is None for r in records):
            _write_overlapped(fd, len(header), records, progress)
            return out
        run: list[int] = []  # [src fd, offset, length] of the pending copy
        streamed: list[TensorRecord] = []  # consecutive streamed records, written as one

        def flush() -> None:
            if run:
                copy_range(run[0], fd, run[1], run[2], progress)
                run.clear()
            if streamed:
                # One writer for the whole run of them: the pipeline does not drain at
                # every tensor (219 drains cost 0.8 s of a 2.5 GiB cast).
                write_pieces(fd, _pieces(list(streamed), progress), hold=STREAM_HOLD)
                streamed.clear()

        for r in records:
            if r.load is None and r.fd is not None:
                if run and run[0] == r.fd and run[1] + run[2] == r.offset:
                    run[2] += r.nbytes
                    continue
                flush()
                run.extend((r.fd, r.offset, r.nbytes))
                continue
            if r.stream is not None:
                if run:
                    flush()
                streamed.append(r)
                continue
            flush()
            write_all(fd, record_bytes(r))
            if progress is not None:
                progress(r.nbytes)
        flush()
    return out


def _pieces(records: Sequence[TensorRecord], progress: Progress | None
            ) -> Iterator[bytes | bytearray | memoryview]:
    """The pieces of every record's stream, in order, each record checked for length."""
    for r in records:
        assert r.stream is not None
        made = 0
        for piece in r.stream():
            made += memoryview(piece).nbytes
            yield piece
        if made != r.nbytes:
            raise AssertionError(f"{r.name}: streamed {made} bytes, expected {r.nbytes}")
        if progress is not None:
            progress(r.nbytes)


class _StalePrefill(Exception):
    pass


def _write_over_prefill(out: Path, mode_from: Path | None, prefill: Prefill, header: bytes,
                        records: Sequence[TensorRecord], entries: Sequence[TensorEntry],
                        progress: Progress | None) -> Path:
    """The output is the source's bytes but for the tensors ``records`` load, and the
    background copy of the source is under way: compute each of those (torch releases the
    GIL while it does), and write it once the copy has gone past its place."""
    source_fd = next(r.fd for r in records if r.load is None)
    assert source_fd is not None
    try:
        with atomic_write(out, mode_from=mode_from, prefill=prefill) as fh:
            fd = fh.fileno()
            try:
                for r, e in zip(records, entries, strict=True):
                    if r.load is not None:
                        data = record_bytes(r)
                        at = len(header) + e.begin
                        prefill.wait_past(at + len(data))
                        pwrite_all(fd, data, at)
                        del data
                    if progress is not None:
                        progress(r.nbytes)
            except BaseException:
                prefill.halt()  # before atomic_write closes the file under the copy
                raise
            if not prefill.finish(source_fd):
                raise _StalePrefill
            os.lseek(fd, prefill.size, os.SEEK_SET)
    finally:
        prefill.close_source()
    return out


def _prefilled(out: Path, header: bytes, records: Sequence[TensorRecord],
               entries: Sequence[TensorEntry]) -> Prefill | None:
    """The background copy of the source started for ``out`` (``init``), when the output
    is that source byte for byte but for the tensors ``records`` load: the same header,
    every other tensor copied from one file at its own offset, nothing after the data."""
    copied = {r.fd for r in records if r.load is None}
    if len(copied) != 1 or None in copied:
        return None
    if any(r.load is None and r.offset != len(header) + e.begin
           for r, e in zip(records, entries, strict=True)):
        return None
    (fd,) = copied
    assert fd is not None
    end = len(header) + (entries[-1].end if entries else 0)
    if os.fstat(fd).st_size != end:
        return None
    return take_prefill(out, fd)


def _write_overlapped(fd: int, start: int, records: Sequence[TensorRecord],
                      progress: Progress | None) -> None:
    """Write the data section of ``records`` from ``start``: the byte ranges copied in the
    kernel by a second thread while this one computes the others (``init`` runs torch, so
    on two cores the copy of the untouched 90 % and the initialisation overlap). Every
    tensor's place is known from the sizes, so each side writes at its own offsets."""
    copies: list[list[int]] = []  # [src fd, offset, length, out offset], runs coalesced
    loads: list[tuple[TensorRecord, int]] = []
    cursor = start
    for r in records:
        if r.load is None and r.fd is not None:
            last = copies[-1] if copies else None
            if last and last[0] == r.fd and last[1] + last[2] == r.offset and \
                    last[3] + last[2] == cursor:
                last[2] += r.nbytes
            else:
                copies.append([r.fd, r.offset, r.nbytes, cursor])
        else:
            loads.append((r, cursor))
        cursor += r.nbytes
    lock = threading.Lock()
    report = None
    if progress is not None:
        def report(n: int) -> None:
            with lock:
                progress(n)

    failed: list[BaseException] = []
    stop = threading.Event()

    def copy_all() -> None:
        try:
            for src, offset, length, at in copies:
                copy_range_at(src, fd, offset, length, at, report, stop.is_set)
        except BaseException as exc:
            failed.append(exc)

    copier = start_worker(copy_all, "copy")
    try:
        for r, at in loads:
            if failed:
                break
            pwrite_all(fd, record_bytes(r), at)
            if report is not None:
                report(r.nbytes)
    except BaseException:
        stop.set()
        raise
    finally:
        copier.join()
    if failed:
        raise failed[0]
    os.lseek(fd, cursor, os.SEEK_SET)


def rewrite_file(path: Path, header: Header, identity: FileIdentity | None, edit: Edit,
                 frozen: set[str], out: Path | None, progress: Progress | None = None, *,
                 display: str = "") -> Path:
    """Apply ``edit`` to the safetensors file at ``path`` (read as ``header``), in place or
    to ``out``: only the header changes for flags; untouched tensors are copied byte for
    byte, in one in-kernel copy per run of them."""
    target = out or path
    base_meta = {k: v for k, v in header.metadata.items() if k != FROZEN_KEY}
    with locked(path, expect=identity) as fd:
        if fd is None:
            raise source_gone(display or str(path))
        if not edit.init:  # flags only: a new header before the same data section
            meta = frozen_metadata(base_meta, frozen)
            new = (len(header.raw).to_bytes(8, "little") + header.raw
                   if meta == header.metadata else splice_metadata(header, meta))
            if new is not None:
                with atomic_write(target, mode_from=path) as fh:
                    write_all(fh.fileno(), new)
                    copy_range(fd, fh.fileno(), header.data_start, header.data_size, progress)
                return target
        records = edited(header_records(fd, header, header.frozen), edit, frozen)
        return write_safetensors(target, records, base_meta, progress, keep=header,
                                 mode_from=path)


class SafetensorsLike(Protocol):
    display: str
    path: Path
    identity: FileIdentity | None
    header: Header

    def new_frozen(self, edit: Edit) -> set[str]: ...


def rewrite(source: SafetensorsLike, edit: Edit, out: Path | None,
            progress: Progress | None = None) -> Path:
    """Apply ``edit`` to a safetensors source, in place or to another ``.safetensors``."""
    return rewrite_file(source.path, source.header, source.identity, edit,
                        source.new_frozen(edit), out, progress, display=source.display)
