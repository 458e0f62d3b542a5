"""The safetensors layout: an 8-byte header length, a JSON header, then the data.

Shared by the reader (``sources/safetensors.py``, ``sources/sharded.py``) and the writers.
The frozen state lives in ``__metadata__["paramctl.frozen"]``, a JSON array of names.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from dataclasses import dataclass
from typing import Any, TypeGuard

from paramctl.errors import CorruptFileError
from paramctl.formats import FROZEN_KEY
from paramctl.io.reader import ByteReader
from paramctl.model import DTYPE_SIZES, TensorRecord

__all__ = [
    "CODES",
    "DTYPES",
    "FROZEN_KEY",
    "Header",
    "TensorEntry",
    "encode_header",
    "frozen_metadata",
    "header_records",
    "read_header",
]

MAX_HEADER_BYTES = 100_000_000

# safetensors dtype codes -> torch dtype names
DTYPES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "C64": "complex64",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}
CODES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # torch name
    shape: tuple[int, ...]
    begin: int  # relative to the data section
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A parsed, validated header; ``data_start`` is the absolute data offset."""

    tensors: list[TensorEntry]
    metadata: dict[str, str]
    data_start: int
    data_size: int
    raw: bytes

    @property
    def frozen(self) -> set[str]:
        raw = self.metadata.get(FROZEN_KEY)
        if raw is None:
            return set()
        try:
            names = json.loads(raw)
        except ValueError:
            names = None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise CorruptFileError(f"__metadata__[{FROZEN_KEY!r}] is not a JSON array of names")
        return set(names)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise CorruptFileError(f"duplicate entry {key!r} in the header")
        out[key] = value
    return out


_INT64_MAX = (1 << 63) - 1
_MAX_DIMS = 1024


def _int_list(value: Any) -> TypeGuard[list[int]]:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _INT64_MAX for v in value
    )


def _too_many_elements(shape: list[int]) -> bool:
    n = 1
    for d in shape:
        n *= d
        if n > _INT64_MAX:
            return True
    return False


def read_header(reader: ByteReader) -> Header:
    """Parse and validate the header of a safetensors file without reading tensor data."""
    path, file_size = reader.name, reader.size
    if file_size == 0:
        raise CorruptFileError(f"{path}: the file is empty")
    if file_size < 8:
        raise CorruptFileError(f"{path}: too short to be a safetensors file")
    (n,) = struct.unpack("<Q", reader.pread(8, 0))
    if n > MAX_HEADER_BYTES:
        raise CorruptFileError(f"{path}: header length {n} is over the {MAX_HEADER_BYTES} "
                               "byte limit (not a safetensors file?)")
    if 8 + n > file_size:
        raise CorruptFileError(f"{path}: header length {n} is larger than the file "
                               "(truncated or not a safetensors file)")
    raw = reader.pread(n, 8)
    if len(raw) != n:
        raise CorruptFileError(f"{path}: truncated header")
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except CorruptFileError as exc:
        raise CorruptFileError(f"{path}: {exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError, MemoryError):
        raise CorruptFileError(f"{path}: header is not valid JSON "
                               "(not a safetensors file?)") from None
    if not isinstance(doc, dict):
        raise CorruptFileError(f"{path}: header is not a JSON object")
    meta = doc.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CorruptFileError(f"{path}: __metadata__ must map strings to strings")
    data_start = 8 + n
    data_size = file_size - data_start
    entries: list[TensorEntry] = []
    for name, info in doc.items():
        if not isinstance(info, dict):
            raise CorruptFileError(f"{path}: entry {name!r} is not an object")
        code = info.get("dtype")
        if not isinstance(code, str) or code not in DTYPES:
            raise CorruptFileError(f"{path}: tensor {name!r} has unknown dtype {code!r:.40}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not _int_list(shape) or not _int_list(offsets) or len(offsets) != 2:
            raise CorruptFileError(f"{path}: tensor {name!r} has a malformed shape or offsets")
        if len(shape) > _MAX_DIMS or _too_many_elements(shape):
            raise CorruptFileError(f"{path}: tensor {name!r} has an impossible shape")
        entry = TensorEntry(name, DTYPES[code], tuple(shape), offsets[0], offsets[1])
        if entry.begin > entry.end or entry.end > data_size:
            raise CorruptFileError(f"{path}: tensor {name!r} lies outside the data section")
        if entry.end - entry.begin != entry.numel * DTYPE_SIZES[entry.dtype]:
            raise CorruptFileError(f"{path}: tensor {name!r} has {entry.end - entry.begin} "
                                   f"bytes but its shape and dtype need "
                                   f"{entry.numel * DTYPE_SIZES[entry.dtype]}")
        entries.append(entry)
    by_offset = sorted(entries, key=lambda e: (e.begin, e.end))
    for prev, cur in itertools.pairwise(by_offset):
        if cur.begin < prev.end:
            raise CorruptFileError(f"{path}: tensors {prev.name!r} and {cur.name!r} overlap")
    return Header(entries, meta, data_start, data_size, raw)


def encode_header(tensors: list[TensorEntry], metadata: dict[str, str]) -> bytes:
    """Serialise a header (with its 8-byte length), space-padded to a multiple of 8."""
    doc: dict[str, Any] = {}
    if metadata:
        doc["__metadata__"] = metadata
    for e in tensors:
        doc[e.name] = {"dtype": CODES[e.dtype], "shape": list(e.shape),
                       "data_offsets": [e.begin, e.end]}
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * ((-len(body)) % 8)
    return struct.pack("<Q", len(body)) + body


def frozen_metadata(metadata: dict[str, str], frozen: set[str]) -> dict[str, str]:
    """``metadata`` with the frozen list set (or removed when nothing is frozen)."""
    out = {k: v for k, v in metadata.items() if k != FROZEN_KEY}
    if frozen:
        out[FROZEN_KEY] = json.dumps(sorted(frozen))
    return out


def header_records(fd: int, header: Header, frozen: set[str]) -> list[TensorRecord]:
    """The tensors of an open safetensors file as byte ranges, in file order."""
    start = header.data_start
    return [TensorRecord(e.name, e.dtype, e.shape, e.name in frozen, e.end - e.begin, fd,
                         start + e.begin)
            for e in sorted(header.tensors, key=lambda e: e.begin)]
