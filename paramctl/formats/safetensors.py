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
from itertools import chain, repeat
from json.encoder import encode_basestring
from operator import itemgetter, le, lt, mul, sub
from typing import Any, NamedTuple, TypeGuard

from paramctl.errors import CorruptFileError
from paramctl.formats import FROZEN_KEY, recorded_frozen
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
    "splice_metadata",
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


class TensorEntry(NamedTuple):
    """One tensor of the header. A named tuple, not a dataclass: a header can hold 100,000
    of them, and a tuple is built in C (see ``_bulk_entries``)."""

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
        return recorded_frozen(self.metadata, "__metadata__")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise CorruptFileError(f"duplicate entry {key!r} in the header")
            seen.add(key)
    return out


def _lost_no_key(raw: bytes, doc: Any) -> bool:
    """True when ``doc``, parsed from ``raw`` by a plain ``json.loads`` (which keeps the last
    of two equal keys), provably lost no duplicate key.

    Outside strings, valid JSON has a colon after each key and nowhere else. So ``raw``
    holds at least as many colons as keys, and when the parsed objects hold as many keys as
    ``raw`` holds colons, none was lost (colons inside strings, or objects nested deeper
    than a header's two levels, which are not counted, only send a header to the exact
    parse). Counting one byte is about free; the exact parse, an ``object_pairs_hook``
    call per object, doubles the time a header of 100,000 entries takes.
    """
    if not isinstance(doc, dict):
        return False
    keys = len(doc) + sum(len(v) for v in doc.values() if type(v) is dict)
    return raw.count(b":") == keys


def _parse(raw: bytes, path: str) -> Any:
    """The header as JSON; a duplicate key anywhere is an error."""
    try:
        text = raw.decode("utf-8")
        doc = json.loads(text)
        if _lost_no_key(raw, doc):
            return doc
        # The exact parse: it names the duplicate key (or, for invalid JSON, fails alike).
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except CorruptFileError as exc:
        raise CorruptFileError(f"{path}: {exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError, MemoryError):
        pass
    try:  # a duplicate key before a syntax error is reported as the duplicate
        json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except CorruptFileError as exc:
        raise CorruptFileError(f"{path}: {exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError, MemoryError):
        pass
    raise CorruptFileError(f"{path}: header is not valid JSON (not a safetensors file?)")


_INT64_MAX = (1 << 63) - 1
_MAX_DIMS = 1024
_INT = {int}


def _int_list(value: Any) -> TypeGuard[list[int]]:
    """A list of int64-sized non-negative ints (JSON's true and false are not ints)."""
    return type(value) is list and (not value or (
        set(map(type, value)) == _INT and min(value) >= 0 and max(value) <= _INT64_MAX))


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
    doc = _parse(raw, path)
    if not isinstance(doc, dict):
        raise CorruptFileError(f"{path}: header is not a JSON object")
    meta = doc.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CorruptFileError(f"{path}: __metadata__ must map strings to strings")
    data_start = 8 + n
    data_size = file_size - data_start
    entries = _bulk_entries(doc, data_size)
    if entries is None:  # something is wrong: find the first bad entry and say what
        entries = _checked_entries(doc, data_size, path)
    by_offset = sorted(entries, key=_SPAN)
    begins, ends = list(map(_BEGIN, by_offset)), list(map(_END, by_offset))
    if any(map(lt, begins[1:], ends)):
        for prev, cur in itertools.pairwise(by_offset):
            if cur.begin < prev.end:
                raise CorruptFileError(f"{path}: tensors {prev.name!r} and {cur.name!r} "
                                       "overlap")
    return Header(entries, meta, data_start, data_size, raw)


_SPAN, _BEGIN, _END = itemgetter(3, 4), itemgetter(3), itemgetter(4)
_CODE_SET = frozenset(DTYPES)
_ITEM_SIZES = {code: DTYPE_SIZES[name] for code, name in DTYPES.items()}
_LIST, _DICT = {list}, {dict}


def _bulk_entries(doc: dict[str, Any], data_size: int) -> list[TensorEntry] | None:
    """The entries of a well-formed header, checked a whole column at a time by C-level
    built-ins (a header can hold 100,000 entries); ``None`` when any check fails."""
    infos = list(doc.values())
    if not infos:
        return []
    if set(map(type, infos)) != _DICT:
        return None
    get = dict.get
    codes: list[Any] = list(map(get, infos, repeat("dtype")))
    shapes: list[Any] = list(map(get, infos, repeat("shape")))
    offsets: list[Any] = list(map(get, infos, repeat("data_offsets")))
    try:
        if not set(codes) <= _CODE_SET:
            return None
    except TypeError:  # an unhashable dtype
        return None
    if set(map(type, shapes)) != _LIST or set(map(type, offsets)) != _LIST:
        return None
    if set(map(len, offsets)) != {2} or max(map(len, shapes)) > _MAX_DIMS:
        return None
    for column in (chain.from_iterable(shapes), chain.from_iterable(offsets)):
        values = list(column)
        if values and (set(map(type, values)) != _INT or min(values) < 0
                       or max(values) > _INT64_MAX):
            return None
    numels = list(map(math.prod, shapes))
    if max(numels) > _INT64_MAX or 0 in numels:  # a zero dimension: check the exact way
        return None
    begins = list(map(itemgetter(0), offsets))
    ends = list(map(itemgetter(1), offsets))
    if max(ends) > data_size or not all(map(le, begins, ends)):
        return None
    wanted = map(mul, numels, map(_ITEM_SIZES.__getitem__, codes))
    if list(map(sub, ends, begins)) != list(wanted):
        return None
    dtypes = map(DTYPES.__getitem__, codes)
    rows = zip(doc, dtypes, map(tuple, shapes), begins, ends, strict=True)
    return list(map(tuple.__new__, repeat(TensorEntry), rows))


def _checked_entries(doc: dict[str, Any], data_size: int, path: str) -> list[TensorEntry]:
    """The entries, checked one by one: raises on the first bad one."""
    entries: list[TensorEntry] = []
    for name, info in doc.items():
        if type(info) is not dict:
            raise CorruptFileError(f"{path}: entry {name!r} is not an object")
        code = info.get("dtype")
        if type(code) is not str or code not in DTYPES:
            raise CorruptFileError(f"{path}: tensor {name!r} has unknown dtype {code!r:.40}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not _int_list(shape) or not _int_list(offsets) or len(offsets) != 2:
            raise CorruptFileError(f"{path}: tensor {name!r} has a malformed shape or offsets")
        numel = math.prod(shape)
        # With no zero dimension the running product only grows, so the whole product
        # tells whether some prefix of it overflows.
        if len(shape) > _MAX_DIMS or numel > _INT64_MAX or (
                numel == 0 and _too_many_elements(shape)):
            raise CorruptFileError(f"{path}: tensor {name!r} has an impossible shape")
        begin, end = offsets
        if begin > end or end > data_size:
            raise CorruptFileError(f"{path}: tensor {name!r} lies outside the data section")
        dtype = DTYPES[code]
        if end - begin != numel * DTYPE_SIZES[dtype]:
            raise CorruptFileError(f"{path}: tensor {name!r} has {end - begin} "
                                   f"bytes but its shape and dtype need "
                                   f"{numel * DTYPE_SIZES[dtype]}")
        entries.append(TensorEntry(name, dtype, tuple(shape), begin, end))
    return entries


def encode_header(tensors: list[TensorEntry], metadata: dict[str, str]) -> bytes:
    """Serialise a header (with its 8-byte length), space-padded to a multiple of 8.

    The text is ``json.dumps`` of ``{"__metadata__": ..., name: {"dtype", "shape",
    "data_offsets"}, ...}`` with ``separators=(",", ":")`` and ``ensure_ascii=False``,
    written entry by entry (names through json's own string encoder) rather than built as
    100,000 small dicts for ``json.dumps``.
    """
    names = [e.name for e in tensors]
    if "__metadata__" in names or len(set(names)) != len(names):
        doc: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        for e in tensors:  # what json.dumps does with such a dict (a later key wins)
            doc[e.name] = {"dtype": CODES[e.dtype], "shape": list(e.shape),
                           "data_offsets": [e.begin, e.end]}
        text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    else:
        parts = [f'"__metadata__":{json.dumps(metadata, separators=(",", ":"), ensure_ascii=False)}'
                 ] if metadata else []
        quote, codes = encode_basestring, CODES
        parts += [f'{quote(e.name)}:{{"dtype":"{codes[e.dtype]}","shape":['
                  f'{",".join(map(str, e.shape))}],"data_offsets":[{e.begin},{e.end}]}}'
                  for e in tensors]
        text = "{" + ",".join(parts) + "}"
    body = text.encode("utf-8")
    body += b" " * ((-len(body)) % 8)
    return struct.pack("<Q", len(body)) + body


_WS = " \t\n\r"


def splice_metadata(header: Header, metadata: dict[str, str]) -> bytes | None:
    """``header`` (with its 8-byte length) with ``__metadata__`` set to ``metadata``
    (left out when empty) and every tensor entry kept byte for byte, space-padded to a
    multiple of 8: a flags-only rewrite, without re-encoding 100,000 entries.

    ``None`` when this cannot be a plain splice: ``__metadata__`` is not the first member
    (safetensors and paramctl write it first), or the data section is not the tensors laid
    end to end (a rewrite then compacts it, which moves offsets).
    """
    spans = sorted((e.begin, e.end) for e in header.tensors)
    ends = [0, *(end for _, end in spans)]
    if ends[-1] != header.data_size or any(
            begin != end for (begin, _), end in zip(spans, ends, strict=False)):
        return None
    text = header.raw.decode("utf-8")
    i = _skip(text, 0)
    if text[i:i + 1] != "{":
        return None
    i = _skip(text, i + 1)
    key = '"__metadata__"'
    if text.startswith(key, i):
        j = _skip(text, i + len(key))
        if text[j:j + 1] != ":":
            return None
        try:
            _, end = json.JSONDecoder().raw_decode(text, _skip(text, j + 1))
        except ValueError:
            return None
        end = _skip(text, end)
        if text[end:end + 1] == ",":
            end += 1
        elif text[end:end + 1] != "}":
            return None
        rest = text[end:]
    elif key in text:
        return None
    else:
        rest = text[i:]
    rest = rest.strip(_WS)
    head = ""
    if metadata:
        head = '"__metadata__":' + json.dumps(metadata, separators=(",", ":"),
                                             ensure_ascii=False)
        if rest != "}":
            head += ","
    body = ("{" + head + rest).encode("utf-8")
    body += b" " * ((-len(body)) % 8)
    return struct.pack("<Q", len(body)) + body


def _skip(text: str, i: int) -> int:
    """The first index from ``i`` that is not JSON whitespace."""
    while text[i:i + 1] and text[i] in _WS:
        i += 1
    return i


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
