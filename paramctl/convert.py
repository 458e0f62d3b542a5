"""Loss-free format conversion, streamed tensor by tensor.

A source describes each tensor as a :class:`TensorSpec` (name, dtype, shape, frozen flag
and where its bytes are); :func:`write_safetensors` and :func:`write_pt` write those
specs without ever holding more than one tensor in memory. The torch zip they write is
what ``torch.save`` writes for a plain state dict (frozen tensors as
``nn.Parameter(requires_grad=False)``), loadable with ``weights_only=True``.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from paramctl.errors import OperationError
from paramctl.fileio import Progress, atomic_write, copy_range, write_all
from paramctl.model import DTYPE_SIZES, FLOAT_DTYPES
from paramctl.sources.pickle_vm import STORAGE_DTYPES
from paramctl.sources.zipio import NewRecord, Record, write_zip

if TYPE_CHECKING:
    from paramctl.sources.base import Edit

__all__ = ["TensorSpec", "convert", "output_kind", "write_pt", "write_safetensors"]

_STORAGE_FOR = {v: k for k, v in STORAGE_DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to write: bytes at ``offset`` of ``fd`` (contiguous), or from ``load``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    frozen: bool
    nbytes: int
    fd: int | None = None
    offset: int = 0
    load: Callable[[], bytes | bytearray] | None = None


def _bytes_of(spec: TensorSpec) -> bytes | bytearray:
    if spec.load is not None:
        return spec.load()
    if spec.fd is None:
        raise AssertionError("TensorSpec without data")
    data = os.pread(spec.fd, spec.nbytes, spec.offset)
    if len(data) != spec.nbytes:
        raise OperationError(f"truncated data for {spec.name!r}")
    return data


def write_safetensors(out: Path, specs: Sequence[TensorSpec], metadata: dict[str, str],
                      progress: Progress | None = None) -> Path:
    from paramctl.sources.safetensors import (
        TensorEntry,
        encode_header,
        frozen_metadata,
    )

    entries = []
    cursor = 0
    for s in specs:
        entries.append(TensorEntry(s.name, s.dtype, s.shape, cursor, cursor + s.nbytes))
        cursor += s.nbytes
    frozen = {s.name for s in specs if s.frozen}
    header = encode_header(entries, frozen_metadata(metadata, frozen))
    with atomic_write(out) as fh:
        fd = fh.fileno()
        write_all(fd, header)
        for s in specs:
            if s.load is None and s.fd is not None:
                copy_range(s.fd, fd, s.offset, s.nbytes, progress)
            else:
                write_all(fd, _bytes_of(s))
                if progress is not None:
                    progress(s.nbytes)
    return out


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


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride = []
    acc = 1
    for d in reversed(shape):
        stride.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(stride))


def state_dict_pickle(specs: Sequence[TensorSpec]) -> bytes:
    """Pickle bytes of ``OrderedDict(name -> tensor)`` with storage keys ``0..n-1``."""
    parts = [b"\x80\x02", _EMPTY_OD, b"("]
    for key, s in enumerate(specs):
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
            _p_tuple(_contiguous_stride(s.shape)) + b"\x89" + _EMPTY_OD + tail + b"tR"
        if s.frozen:
            tensor = _p_global("torch._utils", "_rebuild_parameter") + tensor + b"\x89" + \
                _EMPTY_OD + b"\x87R"
        parts.append(_p_str(s.name) + tensor)
    parts.append(b"u.")
    return b"".join(parts)


def _crc_of(spec: TensorSpec) -> int:
    if spec.load is not None or spec.fd is None:
        return zlib.crc32(_bytes_of(spec))
    crc = 0
    pos = spec.offset
    end = spec.offset + spec.nbytes
    while pos < end:
        chunk = os.pread(spec.fd, min(16 << 20, end - pos), pos)
        if not chunk:
            raise OperationError(f"truncated data for {spec.name!r}")
        crc = zlib.crc32(chunk, crc)
        pos += len(chunk)
    return crc


def write_pt(out: Path, specs: Sequence[TensorSpec], progress: Progress | None = None) -> Path:
    """Write a torch zip checkpoint holding ``specs`` as a flat state dict."""
    prefix = (out.stem or "archive") + "/"
    dt = (1980, 1, 1, 0, 0, 0)
    small = {
        "data.pkl": state_dict_pickle(specs),
        ".format_version": b"1",
        ".storage_alignment": b"64",
        "byteorder": b"little",
    }
    records: list[Record] = []
    replacements: dict[str, NewRecord | Callable[[], NewRecord]] = {}
    for name, data in small.items():
        records.append(Record(prefix + name, 0, len(data), zlib.crc32(data), dt))
        replacements[prefix + name] = NewRecord(data)

    def loader(s: TensorSpec) -> Callable[[], NewRecord]:
        return lambda: NewRecord(_bytes_of(s))

    streams: dict[str, TensorSpec] = {}
    for key, s in enumerate(specs):
        rec_name = f"{prefix}data/{key}"
        if s.load is not None or s.fd is None:
            replacements[rec_name] = loader(s)
            records.append(Record(rec_name, 0, s.nbytes, 0, dt))
        else:
            streams[rec_name] = s
            records.append(Record(rec_name, s.offset, s.nbytes, _crc_of(s), dt))
    tail = {"version": b"3\n", ".data/serialization_id": b"0" * 40}
    for name, data in tail.items():
        records.append(Record(prefix + name, 0, len(data), zlib.crc32(data), dt))
        replacements[prefix + name] = NewRecord(data)
    src_fd = next((s.fd for s in streams.values() if s.fd is not None), -1)
    if any(s.fd != src_fd for s in streams.values()):
        # Tensors from several files (shards): materialise each record on demand.
        for rec_name, s in streams.items():
            replacements[rec_name] = loader(s)
    with atomic_write(out) as fh:
        write_zip(src_fd, fh.fileno(), records, replacements, progress=progress)
    return out


# -- conversions between formats -----------------------------------------------------------
PT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def output_kind(out: Path) -> str:
    """``safetensors``, ``pt`` or ``sharded`` (a folder) for an ``-o`` path."""
    if out.suffix == ".safetensors":
        return "safetensors"
    if out.suffix in PT_SUFFIXES:
        return "pt"
    if out.is_dir() or not out.suffix or str(out).endswith(os.sep):
        return "sharded"
    raise OperationError(f"-o {out}: unknown output type; use .pt, .safetensors or a folder "
                         "(sharded safetensors)")


def _pt_specs(source: Any, edit: Edit, fd: int) -> list[TensorSpec]:
    params = source.params()
    # Only floating-point tensors can be frozen; integer ones are never trainable.
    frozen = edit.frozen_after(
        (p.name for p in params if not p.requires_grad and p.dtype in FLOAT_DTYPES),
        (p.name for p in params if p.dtype in FLOAT_DTYPES))
    specs = []
    for p in params:
        ref = source.tensors[p.name]
        rec = source._storage_record(ref)
        contiguous = ref.stride == _contiguous_stride(ref.shape) and ref.offset == 0 \
            and p.nbytes == rec.size
        if contiguous and p.name not in edit.init:
            specs.append(TensorSpec(p.name, p.dtype, p.shape, p.name in frozen, p.nbytes, fd,
                                    rec.offset))
        else:
            specs.append(TensorSpec(p.name, p.dtype, p.shape, p.name in frozen, p.nbytes,
                                    load=_pt_loader(source, fd, p.name, edit)))
    return specs


def _pt_loader(source: Any, fd: int, name: str, edit: Edit) -> Callable[[], bytes]:
    def load() -> bytes:

        from paramctl.tensors import frombuffer, tensor_bytes

        ref = source.tensors[name]
        rec = source._storage_record(ref)
        buf = bytearray(os.pread(fd, rec.size, rec.offset))  # private: may be changed
        tensor = frombuffer(buf, ref.dtype).as_strided(ref.shape, ref.stride, ref.offset)
        if name in edit.init and edit.init_fn is not None:
            edit.init_fn(name, tensor)
        return tensor_bytes(tensor)

    return load


def _st_specs(source: Any, edit: Edit, fd: int) -> list[TensorSpec]:
    frozen = source.new_frozen(edit)
    specs = []
    start = source.header.data_start
    for e in source.header.tensors:
        nbytes = e.end - e.begin
        if e.name in edit.init:
            specs.append(TensorSpec(e.name, e.dtype, e.shape, e.name in frozen, nbytes,
                                    load=_st_loader(source, fd, e, edit)))
        else:
            specs.append(TensorSpec(e.name, e.dtype, e.shape, e.name in frozen, nbytes, fd,
                                    start + e.begin))
    return specs


def _st_loader(source: Any, fd: int, entry: Any, edit: Edit) -> Callable[[], bytearray]:
    def load() -> bytearray:
        data: bytearray = source._initialised(fd, entry, edit)
        return data

    return load


def convert(source: Any, edit: Edit, out: Path, progress: Progress | None = None) -> Path:
    """Write a single-file source (with ``edit`` applied) as ``out``'s format, streaming."""
    from paramctl.errors import UsageError
    from paramctl.sources.sharded import write_sharded

    kind = output_kind(out)
    if source.format == "pt" and source.key_path and source.options.key is None:
        raise UsageError(
            f"{source.display} holds more than a state dict (under "
            f"{'.'.join(source.key_path)!r}); the other format stores only tensors, so the "
            f"rest would be lost. Pass --key {'.'.join(source.key_path)} to convert just the "
            "weights"
        )
    fd = os.open(source.path, os.O_RDONLY)
    try:
        specs = _pt_specs(source, edit, fd) if source.format == "pt" else \
            _st_specs(source, edit, fd)
        meta = {"format": "pt"}
        if source.format == "safetensors":
            meta = {k: v for k, v in source.header.metadata.items() if k != "paramctl.frozen"}
        if kind == "safetensors":
            return write_safetensors(out, specs, meta, progress)
        if kind == "pt":
            return write_pt(out, specs, progress)
        if edit.max_shard_size is None:
            raise UsageError(f"-o {out} is a folder: pass --max-shard-size (e.g. 5GB) to split "
                             "into sharded safetensors")
        return write_sharded(out, specs, edit.max_shard_size, meta, progress)
    finally:
        os.close(fd)
