"""Write torch zip checkpoints: a spliced rewrite of an existing one, or a fresh state dict
from a record stream.

A rewrite splices the pickle: a plain tensor entry becomes
``torch._utils._rebuild_parameter(<tensor>, False, OrderedDict())`` (exactly what
``torch.save`` writes for a frozen ``nn.Parameter``), an existing Parameter has its
``requires_grad`` byte flipped. Every other pickle byte and every tensor record is copied
unchanged, keeping torch's 64-byte record alignment so ``torch.load(mmap=True)`` works.
A fresh file is what ``torch.save`` writes for a flat state dict (frozen tensors as
``nn.Parameter(requires_grad=False)``), loadable with ``weights_only=True``.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from paramctl.errors import OperationError
from paramctl.formats import STORAGE_DTYPES, contiguous_stride
from paramctl.formats.zip import NewRecord, Record, write_zip
from paramctl.io.files import FileIdentity, atomic_write, locked, read_exact
from paramctl.model import DTYPE_SIZES, Edit, TensorRecord
from paramctl.writers.base import Progress, record_bytes, source_gone

__all__ = ["rewrite", "rewrite_unpickled", "state_dict_pickle", "write_pt"]

_STORAGE_FOR = {v: k for k, v in STORAGE_DTYPES.items()}
_NEWTRUE = b"\x88"
_NEWFALSE = b"\x89"
_PARAM_PREFIX = b"ctorch._utils\n_rebuild_parameter\n"
_PARAM_SUFFIX_FROZEN = b"\x89ccollections\nOrderedDict\n)R\x87R"


# -- a minimal pickle writer for a flat state dict -----------------------------------------
def _p_str(value: str) -> bytes:
    raw = value.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw


def _p_int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _p_tuple(values: Iterable[int]) -> bytes:
    items = [_p_int(v) for v in values]
    if not items:
        return b")"
    return b"(" + b"".join(items) + b"t"


def _p_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


_EMPTY_OD = _p_global("collections", "OrderedDict") + b")R"


def state_dict_pickle(records: Sequence[TensorRecord]) -> bytes:
    """Pickle bytes of ``OrderedDict(name -> tensor)`` with storage keys ``0..n-1``."""
    parts = [b"\x80\x02", _EMPTY_OD, b"("]
    for key, s in enumerate(records):
        numel = s.nbytes // max(DTYPE_SIZES.get(s.dtype, 1), 1)
        if s.dtype in _STORAGE_FOR:
            storage = _p_global("torch", _STORAGE_FOR[s.dtype])
            pid_numel = numel
            func = _p_global("torch._utils", "_rebuild_tensor_v2")
            tail = b""
        else:
            storage = _p_global("torch.storage", "UntypedStorage")
            pid_numel = s.nbytes
            func = _p_global("torch._utils", "_rebuild_tensor_v3")
            tail = _p_global("torch", s.dtype)
        pid = b"(" + _p_str("storage") + storage + _p_str(str(key)) + _p_str("cpu") + \
            _p_int(pid_numel) + b"tQ"
        tensor = func + b"(" + pid + _p_int(0) + _p_tuple(s.shape) + \
            _p_tuple(contiguous_stride(s.shape)) + b"\x89" + _EMPTY_OD + tail + b"tR"
        if s.frozen:
            tensor = _p_global("torch._utils", "_rebuild_parameter") + tensor + b"\x89" + \
                _EMPTY_OD + b"\x87R"
        parts.append(_p_str(s.name) + tensor)
    parts.append(b"u.")
    return b"".join(parts)


def _crc_of(record: TensorRecord) -> int:
    if record.load is not None or record.fd is None:
        return zlib.crc32(record_bytes(record))
    crc = 0
    pos = record.offset
    end = record.offset + record.nbytes
    while pos < end:
        chunk = os.pread(record.fd, min(16 << 20, end - pos), pos)
        if not chunk:
            raise OperationError(f"truncated data for {record.name!r}")
        crc = zlib.crc32(chunk, crc)
        pos += len(chunk)
    return crc


def write_pt(out: Path, records: Sequence[TensorRecord], progress: Progress | None = None
             ) -> Path:
    """Write a torch zip checkpoint holding ``records`` as a flat state dict."""
    prefix = (out.stem or "archive") + "/"
    dt = (1980, 1, 1, 0, 0, 0)
    small = {
        "data.pkl": state_dict_pickle(records),
        ".format_version": b"1",
        ".storage_alignment": b"64",
        "byteorder": b"little",
    }
    entries: list[Record] = []
    replacements: dict[str, NewRecord | Callable[[], NewRecord]] = {}
    for name, data in small.items():
        entries.append(Record(prefix + name, 0, len(data), zlib.crc32(data), dt))
        replacements[prefix + name] = NewRecord(data)

    def loader(r: TensorRecord) -> Callable[[], NewRecord]:
        return lambda: NewRecord(record_bytes(r))

    streams: dict[str, TensorRecord] = {}
    for key, r in enumerate(records):
        rec_name = f"{prefix}data/{key}"
        if r.load is not None or r.fd is None:
            replacements[rec_name] = loader(r)
            entries.append(Record(rec_name, 0, r.nbytes, 0, dt))
        else:
            streams[rec_name] = r
            entries.append(Record(rec_name, r.offset, r.nbytes, _crc_of(r), dt))
    tail = {"version": b"3\n", ".data/serialization_id": b"0" * 40}
    for name, data in tail.items():
        entries.append(Record(prefix + name, 0, len(data), zlib.crc32(data), dt))
        replacements[prefix + name] = NewRecord(data)
    src_fd = next((r.fd for r in streams.values() if r.fd is not None), -1)
    if any(r.fd != src_fd for r in streams.values()):
        # Tensors from several files (shards): materialise each record on demand.
        for rec_name, r in streams.items():
            replacements[rec_name] = loader(r)
    with atomic_write(out) as fh:
        write_zip(src_fd, fh.fileno(), entries, replacements, progress=progress)
    return out


# -- rewriting an existing torch zip ---------------------------------------------------------
class TensorRefLike(Protocol):
    """What the pickle reader records of one tensor (``sources.pickle_vm.TensorRef``)."""

    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    is_parameter: bool
    requires_grad: bool
    span: tuple[int, int]
    grad_span: tuple[int, int] | None


class PtLike(Protocol):
    display: str
    path: Path
    identity: FileIdentity | None
    zip_records: list[Record]
    by_name: dict[str, Record]
    prefix: str
    pickle_record: Record
    pickle_bytes: bytes
    tensors: Mapping[str, Any]
    parsed: Any
    entry_spans: Mapping[str, tuple[tuple[int, int], tuple[int, int]]]

    def _storage_record(self, ref: Any) -> Record: ...


def _string_op(text: str) -> bytes:
    raw = text.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw


def _string_op_length(data: bytes, pos: int) -> int:
    """Length of the string opcode at ``pos`` (the key of a dict entry)."""
    op = data[pos:pos + 1]
    if op == b"X":
        return 5 + int(struct.unpack_from("<I", data, pos + 1)[0])
    if op == b"\x8c":
        return 2 + data[pos + 1]
    if op == b"\x8d":
        return 9 + int(struct.unpack_from("<Q", data, pos + 1)[0])
    if op == b"V":
        return data.index(b"\n", pos) + 1 - pos
    raise OperationError(f"unexpected opcode {op!r} for a state-dict key")


def _memo_defs_and_uses(data: bytes) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``[(position, memo index)]`` of every definition (PUT, MEMOIZE) and use (GET)."""
    import io
    import pickletools

    defs: list[tuple[int, int]] = []
    uses: list[tuple[int, int]] = []
    for op, arg, pos in pickletools.genops(io.BytesIO(data)):
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            defs.append((pos or 0, int(str(arg))))
        elif op.name == "MEMOIZE":
            defs.append((pos or 0, len(defs)))
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            uses.append((pos or 0, int(str(arg))))
    return defs, uses


def splice_pickle(source: PtLike, flags: Mapping[str, bool],
                  renames: Mapping[str, str] | None = None,
                  drops: set[str] | frozenset[str] = frozenset()) -> bytes:
    """The pickle with ``requires_grad`` set per ``flags``, state-dict keys renamed and
    entries dropped; every other byte kept."""
    splices: dict[int, tuple[int, bytes]] = {}  # start -> (end, replacement)
    inserts: dict[int, list[bytes]] = {}
    done: set[int] = set()
    data = source.pickle_bytes
    spans = source.entry_spans
    renames = {k: v for k, v in (renames or {}).items() if k != v and k not in drops}
    if drops:
        defs, uses = _memo_defs_and_uses(data)
        for name in sorted(drops):
            (start, _), (_, end) = spans[name]
            inside = {idx for pos, idx in defs if start <= pos < end}
            if any(idx in inside and not start <= pos < end for pos, idx in uses):
                tied = [n for n, ref in source.tensors.items() if n not in drops
                        and ref is not source.tensors[name]
                        and getattr(ref, "storage", None) is getattr(
                            source.tensors[name], "storage", object())]
                partner = f" (shares its tensor with {', '.join(tied[:3])})" if tied else ""
                raise OperationError(f"cannot drop {name!r}: the file refers to it again "
                                     f"elsewhere{partner}; drop those names too, or keep it")
            splices[start] = (end, b"")
    for old, new in renames.items():
        (start, _), _ = spans[old]
        splices[start] = (start + _string_op_length(data, start), _string_op(new))
    for name, want in flags.items():
        if name in drops:
            continue
        ref: TensorRefLike = source.tensors[name]
        if id(ref) in done:
            continue
        done.add(id(ref))
        if ref.is_parameter:
            if ref.requires_grad == want:
                continue
            if ref.grad_span is None:
                raise OperationError(f"{source.display}: cannot locate requires_grad of "
                                     f"{name!r} in the pickle")
            start, end = ref.grad_span
            splices[start] = (end, _NEWTRUE if want else _NEWFALSE)
        elif not want:
            start, end = ref.span
            inserts.setdefault(start, []).append(_PARAM_PREFIX)
            inserts.setdefault(end, []).insert(0, _PARAM_SUFFIX_FROZEN)
    if not splices and not inserts:
        return source.pickle_bytes
    for start, end in source.parsed.frames:
        splices.setdefault(start, (end, b""))
    pieces: list[bytes] = []
    cursor = 0
    for pos in sorted(set(splices) | set(inserts)):
        if pos < cursor:
            raise OperationError(f"{source.display}: overlapping tensor definitions in the "
                                 "pickle; cannot rewrite it safely")
        pieces.append(data[cursor:pos])
        cursor = pos
        # Suffixes close the previous expression first, then prefixes open the next.
        pieces.extend(inserts.get(pos, []))
        if pos in splices:
            end, repl = splices[pos]
            pieces.append(repl)
            cursor = end
    pieces.append(data[cursor:])
    return b"".join(pieces)


def _init_record(source: PtLike, src_fd: int, rec: Record, names: list[str],
                 init_fn: Callable[[str, Any], None]) -> Callable[[], NewRecord]:
    def build() -> NewRecord:
        from paramctl.tensors import frombuffer

        buf = read_exact(src_fd, rec.size, rec.offset, f"{source.display}: record {rec.name}")
        seen: set[tuple[Any, ...]] = set()
        for name in names:
            ref: TensorRefLike = source.tensors[name]
            key = (ref.offset, ref.shape, ref.stride, ref.dtype)
            if key in seen:
                continue
            seen.add(key)
            view = frombuffer(buf, ref.dtype).as_strided(ref.shape, ref.stride, ref.offset)
            init_fn(name, view)
        return NewRecord(buf, zlib.crc32(buf))

    return build


def _alignment(source: PtLike, fd: int) -> int:
    rec = source.by_name.get(f"{source.prefix}.storage_alignment")
    if rec is None or rec.size > 16:
        return 64
    try:
        value = int(os.pread(fd, rec.size, rec.offset).decode())
    except ValueError:
        return 64
    return value if 0 < value <= 1 << 16 and value & (value - 1) == 0 else 64


def rewrite(source: PtLike, edit: Edit, out: Path | None, progress: Progress | None = None,
            *, renames: Mapping[str, str] | None = None,
            drops: set[str] | frozenset[str] = frozenset()) -> Path:
    """Apply ``edit`` (and ``convert``'s renames and drops of state-dict entries) to a torch
    zip checkpoint, in place or to another torch file. A storage record no remaining
    tensor refers to is left out."""
    target = out or source.path
    with locked(source.path, expect=source.identity) as fd:
        if fd is None:
            raise source_gone(source.display)
        new_pickle = splice_pickle(source, edit.requires_grad, renames, drops)
        zip_records = source.zip_records
        if drops:
            dropped = {id(source.tensors[n]) for n in drops}
            keep = {f"{source.prefix}data/{ref.storage.key}" for ref in source.parsed.tensors
                    if id(ref) not in dropped and id(getattr(ref, "data", None)) not in dropped}
            gone = {f"{source.prefix}data/{source.tensors[n].storage.key}" for n in drops}
            zip_records = [r for r in zip_records if r.name not in gone - keep]
        replacements: dict[str, NewRecord | Callable[[], NewRecord]] = {}
        if new_pickle is not source.pickle_bytes:
            replacements[source.pickle_record.name] = NewRecord(new_pickle)
        if edit.init:
            if edit.init_fn is None:
                raise AssertionError("init without init_fn")
            by_record: dict[str, list[str]] = {}
            for name in edit.init:
                rec = source._storage_record(source.tensors[name])
                by_record.setdefault(rec.name, []).append(name)
            for rec_name, names in by_record.items():
                replacements[rec_name] = _init_record(
                    source, fd, source.by_name[rec_name], sorted(names), edit.init_fn)
        align = _alignment(source, fd)
        with atomic_write(target, mode_from=source.path) as dst:
            write_zip(fd, dst.fileno(), zip_records, replacements, align=align,
                      progress=progress)
    return target


class UnpickledLike(Protocol):
    path: Path
    root: Any
    module: Any
    container: Any  # the state dict mapping inside root (when root is not a module)

    def named_tensors(self) -> dict[str, Any]: ...


def rewrite_unpickled(source: UnpickledLike, edit: Edit, out: Path | None) -> Path:
    """``--unsafe-load`` files: apply ``edit`` to the unpickled object and ``torch.save``
    the whole of it again (not a byte-for-byte streamed rewrite)."""
    import torch

    from paramctl.tensors import apply_edit

    target = out or source.path
    if source.module is not None:
        apply_edit(source.module, edit)
    else:
        container = source.container
        state = source.named_tensors()
        for name in sorted(edit.init):
            if edit.init_fn is not None:
                with torch.no_grad():
                    edit.init_fn(name, state[name].data)
        for name, want in edit.requires_grad.items():
            container[name] = torch.nn.Parameter(state[name].detach(), requires_grad=want)
    with locked(source.path), atomic_write(target, mode_from=source.path) as fh:
        torch.save(source.root, fh)
    return target
