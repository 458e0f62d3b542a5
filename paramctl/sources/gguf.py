"""``.gguf`` files (llama.cpp), read-only: every tensor's name, shape, dtype and size, and
the ``general.*`` metadata, from the header alone.

The layout (GGUF v2 and v3; every integer little-endian, or every one big-endian)::

    "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count     x (string key | u32 value type | value)
    tensor_count x (string name | u32 n_dims | n_dims x u64 ne | u32 ggml type | u64 offset)
    padding to general.alignment (default 32) | tensor data (offsets count from here)

A string is a u64 byte length and UTF-8 bytes; an array a u32 item type, a u64 count and
the items (arrays may nest). ``ne[0]`` is the fastest-varying dimension (a row's length),
so the torch shape is ``ne`` reversed: what ``gguf.GGUFWriter.add_tensor`` writes for a
numpy array of shape ``(a, b)`` lists as ``[a, b]``.

Parsed here rather than with ``gguf.GGUFReader``, which imports numpy, memory-maps the
file and builds a numpy view of every field, array item and tensor: on a Llama-3-8B-sized
header (128k tokens, 280k merges) it took 7.6 s and 650 MiB where this parser took 25 ms
(2 cores, measured side by side). Nothing here imports numpy or torch; a vocabulary is
skipped by walking its string lengths, never decoded.

Quantised tensors (``Q4_K``, ``Q8_0``, ``IQ2_XXS`` ...) keep their GGUF type name as the
dtype; their bytes are ``numel / block_size * type_size``. They cannot train as stored, so
like integer tensors they count as neither trainable nor frozen (they are not in
:data:`~paramctl.model.FLOAT_DTYPES`). Their names are deliberately absent from
:data:`~paramctl.model.DTYPE_SIZES` (no per-element size exists): ``ParamInfo.nbytes`` is
the authority, and GGUF tensors never reach a writer (GGUF is read-only).
"""

from __future__ import annotations

import itertools
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paramctl.errors import CorruptFileError, SourceError, UsageError
from paramctl.io.files import FdPool
from paramctl.io.reader import ByteReader, is_remote, open_reader
from paramctl.model import FLOAT_DTYPES, ParamInfo, TensorRecord
from paramctl.sources import detect
from paramctl.sources.base import OpenOptions, register

__all__ = ["GGML_TYPES", "GGUFHeader", "GGUFSource", "GGUFTensor", "read_gguf_header"]

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# Bounds on what a header may make us parse; real files are far below them (a 256k-token
# vocabulary with its merges is ~10 MiB of metadata; a 100k-tensor MoE ~10 MiB of infos).
MAX_METADATA_BYTES = 64 << 20
MAX_TENSOR_INFO_BYTES = 64 << 20
MAX_ARRAY_DEPTH = 8
MAX_TENSORS = 1_000_000  # a large MoE holds ~100k; the bound keeps a hostile count's memory low
MAX_DIMS = 4  # GGML_MAX_DIMS: llama.cpp refuses more
SMALL_ARRAY = 16  # general.* arrays up to this long are shown whole, longer ones summarised
_INT64_MAX = (1 << 63) - 1
_CHUNK = 1 << 20

# ggml type id -> (dtype paramctl shows, elements per block, bytes per block); copied from
# gguf-py 0.19.0 (constants.GGML_QUANT_SIZES; QK_K = 256). Plain types use torch names.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("float32", 1, 4),
    1: ("float16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("int8", 1, 1),
    25: ("int16", 1, 2),
    26: ("int32", 1, 4),
    27: ("int64", 1, 8),
    28: ("float64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("bfloat16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
}

# GGUF metadata value types
_STRING, _ARRAY = 8, 9
_SCALAR_CODES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                 11: "q", 12: "d"}
_TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32",
               6: "float32", 7: "bool", 8: "string", 9: "array", 10: "uint64", 11: "int64",
               12: "float64"}
# the fewest bytes one item of each type can take (bounds an array's count before reading)
_MIN_SIZE = {code: struct.calcsize("<" + c) for code, c in _SCALAR_CODES.items()}
_MIN_SIZE[_STRING] = 8
_MIN_SIZE[_ARRAY] = 12
_MIN_KV = 8 + 4 + 1  # key length, value type, a one-byte value
_MIN_TENSOR_INFO = 8 + 4 + 4 + 8  # name length, n_dims, type, offset


@dataclass(slots=True)
class GGUFTensor:
    """One tensor info: torch-order shape, dtype name, and where its bytes are."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    nbytes: int
    offset: int  # from the start of the data section


@dataclass
class GGUFHeader:
    """A parsed, validated GGUF header."""

    version: int
    byte_order: str  # "little" or "big"
    metadata: dict[str, Any]  # the general.* keys, JSON-ready
    tensors: list[GGUFTensor]
    alignment: int
    data_start: int  # absolute offset of the data section


class _Cursor:
    """Sequential reads through a :class:`ByteReader`, a large chunk at a time.

    ``limit`` bounds the section being parsed; reading past it, or past the end of the
    file, is a :class:`CorruptFileError` raised before anything is read or allocated.
    """

    def __init__(self, reader: ByteReader, order: str) -> None:
        self.reader = reader
        self.path = reader.name
        self.size = reader.size
        self.buf = b""
        self.start = 0  # file offset of buf[0]
        self.pos = 0  # file offset of the next byte to parse
        self.limit = self.size  # where the section being parsed must end, at the latest
        self.cap = self.size
        self.section = "the header"
        self.order = order
        self.u32 = struct.Struct(order + "I")
        self.u64 = struct.Struct(order + "Q")
        self.scalars = {vtype: struct.Struct(order + c) for vtype, c in _SCALAR_CODES.items()}

    def bound(self, cap: int, section: str) -> None:
        """The section starting here may take at most ``cap`` bytes."""
        self.limit = min(self.pos + cap, self.size)
        self.cap = cap
        self.section = section

    def error(self, what: str, n: int) -> CorruptFileError:
        if self.pos + n > self.size:
            return CorruptFileError(f"{self.path}: {what} runs past the end of the file "
                                    "(truncated, or not a GGUF file)")
        return CorruptFileError(f"{self.path}: {what} takes {self.section} past its "
                                f"{_mib(self.cap)} limit (not a GGUF file?)")

    def fill(self, n: int, what: str) -> None:
        """Make ``buf`` hold the ``n`` bytes at ``pos``."""
        if self.pos + n > self.limit:
            raise self.error(what, n)
        if self.pos + n <= self.start + len(self.buf):
            return
        # never past the limit, so that the buffer holds nothing a bound forbids
        want = min(max(n, _CHUNK), self.limit - self.pos)
        data = self.reader.pread(want, self.pos)
        if len(data) < n:
            raise CorruptFileError(f"{self.path}: {what} runs past the end of the file "
                                   "(it shrank while being read?)")
        self.buf, self.start = data, self.pos

    def take(self, n: int, what: str) -> bytes:
        self.fill(n, what)
        i = self.pos - self.start
        self.pos += n
        return self.buf[i:i + n]

    def unpack(self, st: struct.Struct, what: str) -> tuple[Any, ...]:
        self.fill(st.size, what)
        values = st.unpack_from(self.buf, self.pos - self.start)
        self.pos += st.size
        return values

    def skip(self, n: int, what: str) -> None:
        if self.pos + n > self.limit:
            raise self.error(what, n)
        self.pos += n

    def count(self, n: int, item_size: int, what: str) -> None:
        """Refuse a count of items that cannot fit in what is left of the section."""
        left = self.limit - self.pos
        if n * item_size > left:
            raise self.error(f"{what} ({n:,} item{'s' if n != 1 else ''})", n * item_size)

    def text(self, what: str) -> str:
        (n,) = self.unpack(self.u64, what)
        raw = self.take(n, f"{what} ({n:,} bytes)")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptFileError(f"{self.path}: {what} is not valid UTF-8") from None

    def skip_strings(self, count: int, what: str) -> None:
        """Skip ``count`` strings (a tokenizer's vocabulary): the one hot loop here. Runs
        through the buffer until a length is not in it, then reads on."""
        unpack = self.u64.unpack_from
        done = 0
        while True:
            buf, base = self.buf, self.start
            i = self.pos - base
            k = done
            try:
                for k in range(done, count):  # noqa: B007 (k is read after the loop)
                    i += 8 + unpack(buf, i)[0]
                k = count
            except (struct.error, OverflowError):  # the next length lies past the buffer
                pass
            self.pos = base + i
            if k == count:
                if self.pos > self.limit:
                    raise self.error(f"{what} (a string)", 0)
                return
            (n,) = self.unpack(self.u64, what)
            self.skip(n, f"{what} ({n:,} bytes)")
            done = k + 1


def _q(name: str) -> str:
    """A name from the file, quoted for a message and cut short (keys can be megabytes)."""
    text = repr(name)
    return text if len(text) <= 80 else text[:70] + "...'"


def _mib(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n} byte"


def _f32(x: float) -> float:
    """The shortest decimal that reads back as the same float32 (0.1, not 0.100000001)."""
    packed = struct.pack("<f", x)
    for digits in range(6, 10):
        y = float(f"{x:.{digits}g}")
        if struct.pack("<f", y) == packed:
            return y
    return x


def _json_number(x: Any, vtype: int) -> Any:
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)  # JSON has no NaN or Infinity
        return _f32(x) if vtype == 6 else x
    return x


def _value(cur: _Cursor, vtype: int, key: str, keep: bool, depth: int = 0) -> Any:
    """Parse (``keep``) or skip one metadata value of type ``vtype``."""
    what = f"metadata {_q(key)}"
    st = cur.scalars.get(vtype)
    if st is not None:
        if not keep:
            cur.skip(st.size, what)
            return None
        return _json_number(cur.unpack(st, what)[0], vtype)
    if vtype == _STRING:
        if not keep:
            cur.skip_strings(1, what)
            return None
        (n,) = cur.unpack(cur.u64, what)
        return cur.take(n, f"{what} ({n:,} bytes)").decode("utf-8", "replace")
    if vtype != _ARRAY:
        raise CorruptFileError(f"{cur.path}: {what} has unknown value type {vtype}")
    if depth >= MAX_ARRAY_DEPTH:
        raise CorruptFileError(f"{cur.path}: {what} nests arrays more than "
                               f"{MAX_ARRAY_DEPTH} deep")
    (itype,) = cur.unpack(cur.u32, what)
    (n,) = cur.unpack(cur.u64, what)
    if itype not in _MIN_SIZE:
        raise CorruptFileError(f"{cur.path}: {what} is an array of unknown value type {itype}")
    cur.count(n, _MIN_SIZE[itype], what)
    whole = keep and n <= SMALL_ARRAY
    if whole:
        return [_value(cur, itype, key, True, depth + 1) for _ in range(n)]
    if itype in _SCALAR_CODES:
        cur.skip(n * _MIN_SIZE[itype], what)
    elif itype == _STRING:
        cur.skip_strings(n, what)
    else:
        for _ in range(n):
            _value(cur, itype, key, False, depth + 1)
    return {"item_type": _TYPE_NAMES[itype], "length": n} if keep else None


def _header_start(reader: ByteReader) -> tuple[int, str]:
    """(version, struct byte order) from the first 8 bytes."""
    path = reader.name
    if reader.size == 0:
        raise CorruptFileError(f"{path}: the file is empty")
    head = reader.pread(8, 0)
    if not head.startswith(MAGIC):
        if MAGIC.startswith(head):
            raise CorruptFileError(f"{path}: too short to be a GGUF file")
        raise CorruptFileError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
    if len(head) < 8:
        raise CorruptFileError(f"{path}: too short to be a GGUF file")
    (little,) = struct.unpack("<I", head[4:])
    (big,) = struct.unpack(">I", head[4:])
    if little in (2, 3):
        return little, "<"
    if big in (2, 3):  # written on (or for) a big-endian machine
        return big, ">"
    if 1 in (little, big):
        raise CorruptFileError(f"{path}: GGUF version 1 (2023, 32-bit lengths) is not "
                               "supported; re-convert it with a current llama.cpp")
    raise CorruptFileError(f"{path}: GGUF version {little} is not supported (paramctl "
                           "reads versions 2 and 3)")


def read_gguf_header(reader: ByteReader) -> GGUFHeader:
    """Parse and validate a GGUF header; read no tensor data, import neither numpy nor torch.

    >>> with LocalReader("model.gguf") as r:  # doctest: +SKIP
    ...     [(t.name, t.shape, t.dtype) for t in read_gguf_header(r).tensors][:1]
    [('token_embd.weight', (32000, 4096), 'Q4_K')]
    """
    version, order = _header_start(reader)
    path = reader.name
    cur = _Cursor(reader, order)
    cur.pos = 8
    n_tensors, n_kv = cur.unpack(struct.Struct(order + "QQ"), "the header")
    cur.bound(MAX_METADATA_BYTES, "the metadata")
    cur.count(n_kv, _MIN_KV, "the metadata key count")
    metadata: dict[str, Any] = {}
    seen: set[str] = set()
    alignment = DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key = cur.text("a metadata key")
        if key in seen:
            raise CorruptFileError(f"{path}: duplicate metadata key {_q(key)}")
        seen.add(key)
        (vtype,) = cur.unpack(cur.u32, f"metadata {_q(key)}")
        if key == "general.alignment":
            if vtype != 4:
                raise CorruptFileError(f"{path}: general.alignment is not a uint32")
            (alignment,) = cur.unpack(cur.u32, "general.alignment")
            if alignment == 0 or alignment & (alignment - 1):
                raise CorruptFileError(f"{path}: general.alignment {alignment} is not a "
                                       "power of two")
            metadata[key] = alignment
            continue
        general = key.startswith("general.")
        value = _value(cur, vtype, key, keep=general)
        if general:
            metadata[key] = value
    cur.bound(MAX_TENSOR_INFO_BYTES, "the tensor infos")
    if n_tensors > MAX_TENSORS:
        raise CorruptFileError(f"{path}: {n_tensors:,} tensors is over paramctl's limit of "
                               f"{MAX_TENSORS:,} (not a GGUF file?)")
    cur.count(n_tensors, _MIN_TENSOR_INFO, "the tensor count")
    tensors = _tensor_infos(cur, n_tensors, alignment)
    data_start = -(-cur.pos // alignment) * alignment
    _check_data(path, reader.size, tensors, data_start)
    return GGUFHeader(version, "little" if order == "<" else "big", metadata, tensors,
                      alignment, data_start)


_RawInfo = tuple[bytes, tuple[int, ...], int, int]  # name, ne (file order), type, offset


class _InfoReader:
    """Reads tensor infos; the fast path unpacks straight from the cursor's buffer, and
    the careful path (a buffer boundary, or a malformed info) reads field by field."""

    def __init__(self, cur: _Cursor) -> None:
        self.cur = cur
        self.len_at = cur.u64.unpack_from
        self.ndims_at = cur.u32.unpack_from
        self.dims = [struct.Struct(f"{cur.order}{k}Q") for k in range(MAX_DIMS + 1)]
        self.type_offset = struct.Struct(cur.order + "IQ")

    def next(self, index: int) -> _RawInfo:
        cur = self.cur
        buf, base = cur.buf, cur.start
        j = cur.pos - base
        try:
            (length,) = self.len_at(buf, j)
            end = j + 8 + length
            if end + 4 <= len(buf):
                (n_dims,) = self.ndims_at(buf, end)
                if n_dims <= MAX_DIMS:
                    ne = self.dims[n_dims].unpack_from(buf, end + 4)
                    at = end + 4 + 8 * n_dims
                    ggml_type, offset = self.type_offset.unpack_from(buf, at)
                    cur.pos = base + at + 12
                    return buf[j + 8:end], ne, ggml_type, offset
        except struct.error:  # not all in the buffer
            pass
        return self.careful(index)

    def careful(self, index: int) -> _RawInfo:
        cur = self.cur
        what = f"the name of tensor #{index}"
        (length,) = cur.unpack(cur.u64, what)
        raw = cur.take(length, f"{what} ({length:,} bytes)")
        name = _name(cur.path, raw, index)
        (n_dims,) = cur.unpack(cur.u32, f"tensor {_q(name)}")
        if n_dims > MAX_DIMS:
            raise CorruptFileError(f"{cur.path}: tensor {_q(name)} has {n_dims} dimensions; "
                                   f"GGUF allows at most {MAX_DIMS}")
        ne = cur.unpack(self.dims[n_dims], f"tensor {_q(name)}")
        ggml_type, offset = cur.unpack(self.type_offset, f"tensor {_q(name)}")
        return raw, ne, ggml_type, offset


def _name(path: str, raw: bytes, index: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptFileError(f"{path}: the name of tensor #{index} is not valid "
                               "UTF-8") from None


def _tensor_infos(cur: _Cursor, n: int, alignment: int) -> list[GGUFTensor]:
    """Read and check each tensor info: its type, shape, block rows and alignment."""
    path = cur.path
    reader = _InfoReader(cur)
    tensors: list[GGUFTensor] = []
    names: set[str] = set()
    for i in range(n):
        raw, ne, ggml_type, offset = reader.next(i)
        name = _name(path, raw, i)
        if name in names:
            raise CorruptFileError(f"{path}: duplicate tensor name {_q(name)}")
        names.add(name)
        kind = GGML_TYPES.get(ggml_type)
        if kind is None:
            raise CorruptFileError(f"{path}: tensor {_q(name)} has unknown ggml type "
                                   f"{ggml_type} (newer than paramctl knows, or one "
                                   "llama.cpp removed)")
        dtype, block, type_size = kind
        numel = 1
        for d in ne:
            numel *= d
        if numel > _INT64_MAX:  # at most 4 dims of < 2**64 each: a small product to form
            raise CorruptFileError(f"{path}: tensor {_q(name)} has an impossible shape")
        row = ne[0] if ne else 1
        if row % block:
            raise CorruptFileError(f"{path}: tensor {_q(name)} has rows of {row} elements, "
                                   f"not a multiple of the {dtype} block size {block}")
        if offset % alignment:
            raise CorruptFileError(f"{path}: tensor {_q(name)} starts at offset {offset}, "
                                   f"not a multiple of the alignment {alignment}")
        tensors.append(GGUFTensor(name, tuple(reversed(ne)), dtype, numel,
                                  numel // block * type_size, offset))
    return tensors


def _check_data(path: str, size: int, tensors: list[GGUFTensor], data_start: int) -> None:
    """Every tensor's bytes lie inside the file, and no two tensors share a byte."""
    for t in tensors:
        if t.nbytes and data_start + t.offset + t.nbytes > size:
            raise CorruptFileError(f"{path}: tensor {_q(t.name)} ({t.nbytes:,} bytes at offset "
                                   f"{t.offset}) runs past the end of the file (truncated?)")
    placed = sorted((t for t in tensors if t.nbytes), key=lambda t: t.offset)
    for prev, cur in itertools.pairwise(placed):
        if cur.offset < prev.offset + prev.nbytes:
            raise CorruptFileError(f"{path}: tensors {_q(prev.name)} and {_q(cur.name)} overlap")


class GGUFSource:
    """A ``.gguf`` file: listed from its header; never written (writers refuse it)."""

    format = "gguf"

    def __init__(self, path: str, options: OpenOptions) -> None:
        self.display = path
        self.remote = is_remote(path)
        if options.key:
            raise SourceError("--key applies to torch checkpoints; a GGUF file holds one "
                              "flat set of tensors")
        reader = open_reader(path)
        try:
            self.header = read_gguf_header(reader)
            self.file_size = reader.size
        finally:
            reader.close()

    def params(self) -> list[ParamInfo]:
        # GGUF records no frozen state: a floating-point tensor counts as trainable;
        # quantised and integer ones never do (and are not "frozen" either).
        return [ParamInfo(name=t.name, shape=t.shape, dtype=t.dtype, numel=t.numel,
                          nbytes=t.nbytes, requires_grad=t.dtype in FLOAT_DTYPES)
                for t in self.header.tensors]

    def metadata(self) -> dict[str, Any]:
        """The ``general.*`` keys, in file order (long arrays summarised)."""
        return dict(self.header.metadata)

    def total_bytes(self) -> int:
        return self.file_size

    def records(self, pool: FdPool) -> list[TensorRecord]:
        """Every tensor's stored bytes (``stats`` decodes the float and integer ones and
        lists quantised blocks as not decoded)."""
        if self.remote:
            raise UsageError("remote sources are read-only; download first")
        if self.header.byte_order != "little":
            raise UsageError(f"{self.display}: a big-endian GGUF file: its values are not "
                             "decoded (list works)")
        fd = pool.get(Path(self.display))
        start = self.header.data_start
        return [TensorRecord(t.name, t.dtype, t.shape, False, t.nbytes, fd, start + t.offset)
                for t in self.header.tensors]


register("gguf", detect.gguf, GGUFSource)
