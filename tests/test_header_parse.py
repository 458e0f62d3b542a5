"""The safetensors header reader's fast paths agree with the plain, exact reading.

``read_header`` parses with a plain ``json.loads`` and proves by counting that no duplicate
key was lost, and checks a well-formed header a column at a time. Both are shortcuts: the
reference below is the straightforward reading (a duplicate-rejecting parse, then each entry
checked in order) and every header, well-formed or broken, must give the same entries or the
same error message.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paramctl.errors import CorruptFileError
from paramctl.formats.safetensors import DTYPES, read_header
from paramctl.model import DTYPE_SIZES

INT64_MAX = (1 << 63) - 1


class BytesReader:
    def __init__(self, data: bytes) -> None:
        self.name, self.data, self.size = "F", data, len(data)

    def pread(self, n: int, offset: int) -> bytes:
        return self.data[offset:offset + n]

    def close(self) -> None:
        pass


def _strict(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise CorruptFileError(f"duplicate entry {key!r} in the header")
        out[key] = value
    return out


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= INT64_MAX for v in value)


def reference(raw: bytes, data_size: int) -> tuple[list[tuple[Any, ...]], dict[str, str]]:
    """What a header means, read the slow and obvious way (paramctl 0.1's reader)."""
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_strict)
    except CorruptFileError as exc:
        raise CorruptFileError(f"F: {exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CorruptFileError("F: header is not valid JSON (not a safetensors file?)") from None
    if not isinstance(doc, dict):
        raise CorruptFileError("F: header is not a JSON object")
    meta = doc.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CorruptFileError("F: __metadata__ must map strings to strings")
    entries = []
    for name, info in doc.items():
        if not isinstance(info, dict):
            raise CorruptFileError(f"F: entry {name!r} is not an object")
        code = info.get("dtype")
        if not isinstance(code, str) or code not in DTYPES:
            raise CorruptFileError(f"F: tensor {name!r} has unknown dtype {code!r:.40}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not _int_list(shape) or not _int_list(offsets) or len(offsets) != 2:
            raise CorruptFileError(f"F: tensor {name!r} has a malformed shape or offsets")
        n, too_many = 1, False
        for d in shape:
            n *= d
            too_many = too_many or n > INT64_MAX
        if len(shape) > 1024 or too_many:
            raise CorruptFileError(f"F: tensor {name!r} has an impossible shape")
        begin, end = offsets
        if begin > end or end > data_size:
            raise CorruptFileError(f"F: tensor {name!r} lies outside the data section")
        need = math.prod(shape) * DTYPE_SIZES[DTYPES[code]]
        if end - begin != need:
            raise CorruptFileError(f"F: tensor {name!r} has {end - begin} bytes but its "
                                   f"shape and dtype need {need}")
        entries.append((name, DTYPES[code], tuple(shape), begin, end))
    by_offset = sorted(entries, key=lambda e: (e[3], e[4]))
    for prev, cur in itertools.pairwise(by_offset):
        if cur[3] < prev[4]:
            raise CorruptFileError(f"F: tensors {prev[0]!r} and {cur[0]!r} overlap")
    return entries, meta


def both(raw: bytes, data: bytes = b"") -> None:
    """read_header and the reference agree on RAW as a header followed by DATA."""
    blob = struct.pack("<Q", len(raw)) + raw + data
    try:
        want: Any = reference(raw, len(data))
    except CorruptFileError as exc:
        want = str(exc)
    try:
        header = read_header(BytesReader(blob))
        got: Any = ([tuple(e) for e in header.tensors], header.metadata)
    except CorruptFileError as exc:
        got = str(exc)
    assert got == want


def entry(dtype: str = "F32", shape: Any = (2,), offsets: Any = (0, 8)) -> str:
    return json.dumps({"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple)
                       else shape, "data_offsets": list(offsets)})


@pytest.mark.parametrize("raw", [
    # duplicates where counting colons alone could be fooled
    '{"w":' + entry() + ',"w":' + entry() + '}',
    '{"w" :' + entry() + ', "w":' + entry() + '}',
    '{"__metadata__":{"a":"x:y"},"w":' + entry() + ',"w":' + entry() + '}',
    '{"__metadata__":{"a":":"},"w":' + entry() + ',"w":' + entry() + '}',
    '{"__metadata__":{"a":"1","a":"2"},"w":' + entry() + '}',
    '{"w":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
    '{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":{"y":1,"y":2}}}',
    '{"w":{"dtype":"F32","shape":[{"a":1,"a":1}],"data_offsets":[0,8]}}',
    '{"a:b":' + entry() + ',"a:b":' + entry() + '}',
    '{"w":' + entry() + ',"w":' + entry() + ',"v":' + entry(offsets=(8, 16)) + ' , }',
    '{"w":{"dtype":"F32","shape":[2]},"w":' + entry() + '}',
    # well-formed, with what makes the fast check step aside
    '{"a:b":' + entry() + '}',
    '{ "w" : ' + entry() + ' }',
    '{"__metadata__":{"k":"v:1","k2":"\\":"},"w":' + entry() + '}',
    json.dumps({"w": json.loads(entry())}, indent=2),
    # the bulk path's cases for the exact path
    '{"w":' + entry(shape=(0,), offsets=(0, 0)) + ',"v":' + entry() + '}',
    '{"w":' + entry(shape=(2**40, 2**40, 0), offsets=(0, 0)) + '}',
    '{"w":' + entry(shape=[True, 2]) + '}',
    '{"w":' + entry(dtype=["F32"]) + '}',
    '{"w":' + entry(offsets=(0, 8.0)) + '}',
    '{"w":' + entry() + ',"v":' + entry(offsets=(4, 12)) + '}',
    '{}', '[]', '{"__metadata__":null}', '"x"', '{"w":' + entry(),
])
def test_examples(raw: str) -> None:
    both(raw.encode(), b"\0" * 16)


names = st.text(st.sampled_from('ab.:" \\\u00e9'), min_size=1, max_size=4)
values = st.one_of(st.integers(-2, 20), st.booleans(), st.floats(0, 4), st.text(max_size=2),
                   st.lists(st.integers(0, 4), max_size=3), st.none())


@st.composite
def headers(draw: st.DrawFn) -> tuple[str, int]:
    pieces, cursor = [], 0
    for _ in range(draw(st.integers(0, 5))):
        code = draw(st.sampled_from(["F32", "BF16", "I8", "BOOL", "X"]))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        size = math.prod(shape) * DTYPE_SIZES.get(DTYPES.get(code, ""), 1)
        fields = {"dtype": code, "shape": shape, "data_offsets": [cursor, cursor + size]}
        cursor += size
        if draw(st.booleans()):  # break something
            fields[draw(st.sampled_from(["dtype", "shape", "data_offsets", "x"]))] = \
                draw(values)
        body = ", ".join(f"{json.dumps(k)}{draw(st.sampled_from([':', ' :']))}{json.dumps(v)}"
                         for k, v in fields.items())
        if draw(st.integers(0, 9)) == 0:
            body += f', "dtype": {json.dumps(code)}'
        pieces.append(f"{json.dumps(draw(names))}:{{{body}}}")
    if draw(st.booleans()):
        meta = draw(st.dictionaries(names, st.text(st.sampled_from(':"a '), max_size=3),
                                    max_size=2))
        pieces.insert(draw(st.integers(0, len(pieces))), f'"__metadata__":{json.dumps(meta)}')
    if pieces and draw(st.integers(0, 4)) == 0:  # a duplicate name
        pieces.append(pieces[draw(st.integers(0, len(pieces) - 1))])
    return "{" + ",".join(pieces) + "}", cursor


@settings(max_examples=int(os.environ.get("PARAMCTL_FUZZ_EXAMPLES", "400")), deadline=None)
@given(headers(), st.integers(-2, 2))
def test_random_headers(header: tuple[str, int], slack: int) -> None:
    raw, size = header
    both(raw.encode(), b"\0" * max(0, size + slack))


# -- splice_metadata: a flags-only rewrite keeps every entry's text ----------------------------
def _file_of(header_text: str, data: bytes) -> bytes:
    body = header_text.encode()
    return struct.pack("<Q", len(body)) + body + data


def _saved(tmp: Any, metadata: dict[str, str] | None) -> bytes:
    import torch
    from safetensors.torch import save_file

    path = tmp / "m.safetensors"
    save_file({"b.weight": torch.ones(3), "a.weight": torch.zeros(2, 2, dtype=torch.bfloat16),
               "é": torch.arange(4)}, str(path), metadata=metadata)
    return path.read_bytes()


@pytest.mark.parametrize("before", [None, {"format": "pt"}, {"format": "pt", "x": "1"}])
@pytest.mark.parametrize("after", [{}, {"format": "pt"}, {"paramctl.frozen": '["a.weight"]'}])
def test_splice_metadata_of_a_safetensors_file(tmp_path: Any, before: dict[str, str] | None,
                                               after: dict[str, str]) -> None:
    import torch
    from safetensors.torch import load

    from paramctl.formats.safetensors import splice_metadata

    blob = _saved(tmp_path, before)
    header = read_header(BytesReader(blob))
    new = splice_metadata(header, after)
    assert new is not None and len(new) % 8 == 0
    out = new + blob[header.data_start:]
    again = read_header(BytesReader(out))
    assert again.metadata == after
    assert again.tensors == header.tensors
    # every entry's text is kept: only the __metadata__ member differs
    old_doc, new_doc = json.loads(header.raw), json.loads(again.raw)
    old_doc.pop("__metadata__", None)
    new_doc.pop("__metadata__", None)
    assert list(old_doc.items()) == list(new_doc.items())
    tensors = load(out)  # and safetensors itself reads it
    assert torch.equal(tensors["é"], torch.arange(4))


def test_splice_metadata_refuses_what_is_not_a_plain_splice() -> None:
    from paramctl.formats.safetensors import splice_metadata

    entry = '"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    later = read_header(BytesReader(_file_of('{' + entry + ',"__metadata__":{"k":"v"}}',
                                             b"\0" * 4)))
    assert later.metadata == {"k": "v"}
    assert splice_metadata(later, {}) is None  # __metadata__ not first
    gap = read_header(BytesReader(_file_of(
        '{"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', b"\0" * 8)))
    assert splice_metadata(gap, {"k": "v"}) is None  # the data does not start at 0
    empty = read_header(BytesReader(_file_of("{}  ", b"")))
    spliced = splice_metadata(empty, {"k": "v"})
    assert spliced is not None
    assert read_header(BytesReader(spliced)).metadata == {"k": "v"}
    spaced = read_header(BytesReader(_file_of(
        ' { "__metadata__" : {"k": "v"} , ' + entry + ' }   ', b"\0" * 4)))
    spliced = splice_metadata(spaced, {"f": "1"})
    assert spliced is not None
    assert read_header(BytesReader(spliced + b"\0" * 4)).metadata == {"f": "1"}
