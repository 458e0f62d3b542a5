"""Broken and hostile files, crafted byte by byte: every one is a one-line `error:` and exit 1.

Each case runs the real CLI in a subprocess under a 1 GiB address-space limit and a time
limit, so a large allocation or a hang fails the test instead of passing by luck.
"""

from __future__ import annotations

import io
import json
import os
import resource
import struct
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import gguf_bytes, gguf_kv, gguf_str, gguf_tensor

REPO = Path(__file__).resolve().parent.parent
MEMORY_LIMIT = 1 << 30


def run_limited(*args: str | os.PathLike[str], timeout: float = 60,
                memory: int = MEMORY_LIMIT) -> subprocess.CompletedProcess[str]:
    """``python -m paramctl ARGS`` with RLIMIT_AS (no large allocation) and a timeout."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return subprocess.run(
        [sys.executable, "-m", "paramctl", *map(str, args)], capture_output=True, text=True,
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=timeout,
        preexec_fn=limit,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 1, one `error:` line holding every needle (outside the file's own path)."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "internal error" not in lines[0], lines[0]
    assert result.stdout == ""
    message = lines[0].replace(str(result.args[-1]), "FILE")
    for needle in needles:
        assert needle in message, lines[0]
    return lines[0]


# =======================================================================================
# safetensors


def st_bytes(header: bytes | str | dict[str, object], data: bytes = b"",
             length: int | None = None) -> bytes:
    """A safetensors file: 8-byte little-endian header length, header, data."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    n = len(header) if length is None else length
    return struct.pack("<Q", n) + header + data


def _t(dtype: object = "F32", shape: object = (2,), offsets: object = (0, 8)) -> dict[str, object]:
    return {"dtype": dtype,
            "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}


ST_CASES: dict[str, tuple[bytes, str]] = {
    # name: (file bytes, text the error must contain)
    "empty-file": (b"", "empty"),
    "shorter-than-length-field": (b"\x10\x00\x00", "too short"),
    "length-larger-than-file": (st_bytes("{}", length=4096), "larger than the file"),
    "length-over-100MB": (st_bytes("{}", length=200_000_000), "limit"),
    "length-2**64-1": (st_bytes("{}", length=2**64 - 1), "limit"),
    "length-zero": (st_bytes(b""), "not valid JSON"),
    "header-not-utf8": (st_bytes(b"\xff\xfe{}"), "not valid JSON"),
    "header-not-json": (st_bytes(b"hello, world"), "not valid JSON"),
    "header-truncated-json": (st_bytes(b'{"a": {"dtype": "F32"'), "not valid JSON"),
    "header-is-list": (st_bytes(b"[1, 2, 3]"), "not a JSON object"),
    "header-is-string": (st_bytes(b'"tensor"'), "not a JSON object"),
    "header-is-number": (st_bytes(b"12345678"), "not a JSON object"),
    "header-deeply-nested": (st_bytes(b"[" * 100_000 + b"]" * 100_000), "not valid JSON"),
    "huge-integer-literal": (st_bytes('{"a": ' + json.dumps(_t()).replace(
        "[2]", "[" + "9" * 100_000 + "]") + "}"), "not valid JSON"),
    "entry-not-object": (st_bytes({"w": [1, 2]}, b"\0" * 8), "not an object"),
    "unknown-dtype": (st_bytes({"w": _t(dtype="F128")}, b"\0" * 8), "unknown dtype"),
    "dtype-is-list": (st_bytes({"w": _t(dtype=["F32"])}, b"\0" * 8), "unknown dtype"),
    "dtype-is-number": (st_bytes({"w": _t(dtype=7)}, b"\0" * 8), "unknown dtype"),
    "dtype-missing": (st_bytes({"w": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
                      "unknown dtype"),
    "shape-not-list": (st_bytes({"w": _t(shape="2")}, b"\0" * 8), "malformed shape"),
    "shape-negative": (st_bytes({"w": _t(shape=(-2,))}, b"\0" * 8), "malformed shape"),
    "shape-float": (st_bytes({"w": _t(shape=[2.0])}, b"\0" * 8), "malformed shape"),
    "shape-bool": (st_bytes({"w": _t(shape=[True, True])}, b"\0" * 8), "malformed shape"),
    "shape-over-int64": (st_bytes({"w": _t(shape=(2**64, 1))}, b"\0" * 8), "malformed shape"),
    "numel-over-int64": (st_bytes({"w": _t(shape=(2**40, 2**40))}, b"\0" * 8),
                         "impossible shape"),
    "too-many-dims": (st_bytes({"w": _t(shape=(2,) * 5000 + (0,), offsets=(0, 0))}),
                      "impossible shape"),
    "offsets-missing": (st_bytes({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8),
                        "malformed shape or offsets"),
    "offsets-three": (st_bytes({"w": _t(offsets=(0, 4, 8))}, b"\0" * 8),
                      "malformed shape or offsets"),
    "offsets-negative": (st_bytes({"w": _t(offsets=(-8, 0))}, b"\0" * 8),
                         "malformed shape or offsets"),
    "offsets-reversed": (st_bytes({"w": _t(offsets=(8, 0))}, b"\0" * 8),
                         "outside the data section"),
    "offsets-past-data": (st_bytes({"w": _t(offsets=(8, 16))}, b"\0" * 8),
                          "outside the data section"),
    "offsets-far-past-data": (st_bytes({"w": _t(shape=(2**29,), offsets=(0, 2**31))},
                                       b"\0" * 8), "outside the data section"),
    "size-not-numel-x-itemsize": (st_bytes({"w": _t(shape=(3,), offsets=(0, 8))},
                                           b"\0" * 8), "need"),
    "size-wrong-for-dtype": (st_bytes({"w": _t(dtype="F64", offsets=(0, 8))}, b"\0" * 8),
                             "need"),
    "overlapping-tensors": (st_bytes({"a": _t(offsets=(0, 8)), "b": _t(offsets=(4, 12))},
                                     b"\0" * 12), "overlap"),
    "same-bytes-twice": (st_bytes({"a": _t(offsets=(0, 8)), "b": _t(offsets=(0, 8))},
                                  b"\0" * 8), "overlap"),
    "duplicate-names": (st_bytes('{"w": ' + json.dumps(_t()) + ', "w": '
                                 + json.dumps(_t()) + "}", b"\0" * 8), "duplicate"),
    "duplicate-metadata": (st_bytes('{"__metadata__": {}, "__metadata__": {}}'), "duplicate"),
    "metadata-non-string-value": (st_bytes({"__metadata__": {"format": 1}}),
                                  "strings to strings"),
    "metadata-nested-object": (st_bytes({"__metadata__": {"a": {"b": "c"}}}),
                               "strings to strings"),
    "metadata-is-list": (st_bytes({"__metadata__": ["format", "pt"]}), "strings to strings"),
    "metadata-is-empty-list": (st_bytes({"__metadata__": []}), "strings to strings"),
    "metadata-is-false": (st_bytes({"__metadata__": False}), "strings to strings"),
    "frozen-list-not-json": (st_bytes({"__metadata__": {"paramctl.frozen": "[oops"}}),
                             "paramctl.frozen"),
    "frozen-list-of-numbers": (st_bytes({"__metadata__": {"paramctl.frozen": "[1, 2]"}}),
                               "paramctl.frozen"),
    "name-with-newline": (st_bytes({"a\nb": _t(dtype="nope")}, b"\0" * 8), "unknown dtype"),
}


@pytest.mark.parametrize("name", list(ST_CASES))
def test_malformed_safetensors(name: str, tmp_path: Path) -> None:
    data, needle = ST_CASES[name]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    line = assert_one_line_error(run_limited("list", path), needle)
    assert str(path) in line


@pytest.mark.parametrize("name", ["length-larger-than-file", "overlapping-tensors",
                                  "duplicate-names", "metadata-is-list"])
def test_malformed_safetensors_rewrite_refused(name: str, tmp_path: Path) -> None:
    """A write command reads the file first: same one-line error, nothing written."""
    data, needle = ST_CASES[name]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    assert_one_line_error(run_limited("freeze", path, "*"), needle)
    assert path.read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["bad.safetensors"]


def test_header_limit_checked_before_reading(tmp_path: Path) -> None:
    """A header length of 99 MB on a sparse 100 MB file is read (it is within the limit) but
    the error comes without holding more than the limit allows."""
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", 99_000_000) + b"{")
        fh.truncate(100_000_000)
    assert_one_line_error(run_limited("list", path, memory=512 << 20), "not valid JSON")


# =======================================================================================
# torch zips


def _zip_records(src: Path) -> tuple[str, dict[str, bytes]]:
    with zipfile.ZipFile(src) as zf:
        names = zf.namelist()
        prefix = names[0].split("/", 1)[0] + "/"
        return prefix, {n: zf.read(n) for n in names}


def _write_zip(path: Path, records: dict[str, bytes],
               compress: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compress) as zf:
        for name, data in records.items():
            zf.writestr(name, data)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _with_pickle(src: Path, payload: bytes) -> dict[str, bytes]:
    prefix, records = _zip_records(src)
    records[prefix + "data.pkl"] = payload
    return records


def _zip64_bad_offset() -> bytes:
    """One stored record whose central entry puts its header at 2**64 - 1 (zip64 extra)."""
    name, data = b"m/data.pkl", b"\x80\x02}."
    crc = zlib.crc32(data)
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0x21, crc, len(data),
                        len(data), len(name), 0) + name + data
    extra = struct.pack("<HHQ", 1, 8, 2**64 - 1)
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 0, 0, 0x21, crc,
                          len(data), len(data), len(name), len(extra), 0, 0, 0, 0,
                          0xFFFFFFFF) + name + extra
    eocd = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), len(local), 0)
    return local + central + eocd


PtCase = Callable[[Path, Path], None]  # (samples_dir, out file) -> writes out


def _truncate(fraction: float) -> PtCase:
    def make(samples: Path, out: Path) -> None:
        data = (samples / "mlp.pt").read_bytes()
        out.write_bytes(data[: int(len(data) * fraction)])

    return make


def _cut_tail(n: int) -> PtCase:
    def make(samples: Path, out: Path) -> None:
        out.write_bytes((samples / "mlp.pt").read_bytes()[:-n])

    return make


def _records(change: Callable[[str, dict[str, bytes]], None],
             compress: int = zipfile.ZIP_STORED) -> PtCase:
    def make(samples: Path, out: Path) -> None:
        prefix, records = _zip_records(samples / "mlp.pt")
        change(prefix, records)
        _write_zip(out, records, compress)

    return make


def _pickle(payload: bytes) -> PtCase:
    def make(samples: Path, out: Path) -> None:
        _write_zip(out, _with_pickle(samples / "mlp.pt", payload))

    return make


def _raw(data: bytes) -> PtCase:
    def make(samples: Path, out: Path) -> None:
        out.write_bytes(data)

    return make


def _pickle_edit(old: bytes, new: bytes) -> PtCase:
    def make(samples: Path, out: Path) -> None:
        prefix, records = _zip_records(samples / "mlp.pt")
        pkl = records[prefix + "data.pkl"]
        assert old in pkl
        records[prefix + "data.pkl"] = pkl.replace(old, new, 1)
        _write_zip(out, records)

    return make


def _grow_record(prefix: str, records: dict[str, bytes]) -> None:
    records[prefix + "data/0"] += b"\0" * 4


def _shrink_record(prefix: str, records: dict[str, bytes]) -> None:
    records[prefix + "data/0"] = records[prefix + "data/0"][:-4]


def _drop(name: str) -> Callable[[str, dict[str, bytes]], None]:
    def change(prefix: str, records: dict[str, bytes]) -> None:
        del records[prefix + name]

    return change


def _torchscript(prefix: str, records: dict[str, bytes]) -> None:
    records[prefix + "constants.pkl"] = b"\x80\x02)."
    records[prefix + "code/__torch__.py"] = b"# code"


PT_CASES: dict[str, tuple[PtCase, str]] = {
    "empty-file": (_raw(b""), "empty"),
    "not-a-zip-text": (_raw(b"hello, this is not a checkpoint\n"), "not a zip"),
    "not-a-zip-binary": (_raw(bytes(range(256)) * 4), "not a zip"),
    "zip-magic-then-junk": (_raw(b"PK\x03\x04" + b"\0" * 100), "zip"),
    "empty-zip": (_raw(b"PK\x05\x06" + b"\0" * 18), "zip"),
    "truncated-to-half": (_truncate(0.5), "zip"),
    "truncated-to-10-bytes": (_truncate(0.001), "zip"),
    "truncated-inside-eocd": (_cut_tail(5), "zip"),
    "truncated-inside-central-dir": (_cut_tail(200), "zip"),
    "missing-data.pkl": (_records(_drop("data.pkl")), "no data.pkl"),
    "missing-data-record": (_records(_drop("data/0")), "missing data record"),
    "record-larger-than-tensor": (_records(_grow_record), "holds"),
    "record-smaller-than-tensor": (_records(_shrink_record), "holds"),
    "compressed-records": (_records(lambda p, r: None, zipfile.ZIP_DEFLATED), "compressed"),
    "torchscript-archive": (_records(_torchscript), "TorchScript"),
    "zip64-header-offset-2**64": (_raw(_zip64_bad_offset()), "cut off"),
    "pickle-is-a-list": (_pickle(b"\x80\x02]q\x00(K\x01K\x02e."), "no state dict"),
    "pickle-is-an-int": (_pickle(b"\x80\x02K\x07."), "no state dict"),
    "pickle-is-none": (_pickle(b"\x80\x02N."), "no state dict"),
    "pickle-is-empty-dict": (_pickle(b"\x80\x02}."), "empty dict"),
    "pickle-dict-without-tensors": (_pickle(b"\x80\x02}X\x05\x00\x00\x00epochK\x03s."),
                                    "no state dict"),
    "pickle-empty": (_pickle(b""), "pickle"),
    "pickle-truncated": (_pickle(b"\x80\x02}X\x05\x00\x00\x00epo"), "pickle"),
    "pickle-no-stop": (_pickle(b"\x80\x02}"), "STOP"),
    "pickle-trailing-data": (_pickle(b"\x80\x02}.junk"), "after the end"),
    "pickle-stack-underflow": (_pickle(b"\x80\x02s."), "pickle"),
    "pickle-unknown-memo": (_pickle(b"\x80\x02h\x05."), "memo"),
    "pickle-bad-opcode": (_pickle(b"\x80\x02\xff."), "pickle"),
    "pickle-unknown-persistent-id": (_pickle(b"\x80\x02X\x03\x00\x00\x00abcQ."),
                                     "persistent id"),
    "pickle-text-persistent-id": (_pickle(b"\x80\x02Pabc\n."), "persistent ids"),
    "tensor-negative-shape": (_pickle_edit(b"K\x20K\x10\x86", b"J\xff\xff\xff\xffK\x10\x86"),
                              "shape"),
    "tensor-shape-over-int64": (_pickle_edit(b"K\x20K\x10\x86",
                                             b"\x8a\x09" + b"\xff" * 8 + b"\x01K\x10\x86"),
                                "int64"),
    "tensor-past-its-storage": (_pickle_edit(b"K\x20K\x10\x86", b"K\x40K\x10\x86"),
                                "past the end of its storage"),
}


@pytest.mark.parametrize("name", list(PT_CASES))
def test_malformed_torch_zip(name: str, samples_dir: Path, tmp_path: Path) -> None:
    make, needle = PT_CASES[name]
    path = tmp_path / "bad.pt"
    make(samples_dir, path)
    assert_one_line_error(run_limited("list", path), needle)


@pytest.mark.parametrize("name", ["truncated-to-half", "missing-data-record",
                                  "record-smaller-than-tensor", "pickle-is-a-list"])
def test_malformed_torch_zip_rewrite_refused(name: str, samples_dir: Path,
                                             tmp_path: Path) -> None:
    make, needle = PT_CASES[name]
    path = tmp_path / "bad.pt"
    make(samples_dir, path)
    before = path.read_bytes()
    assert_one_line_error(run_limited("freeze", path, "*"), needle)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["bad.pt"]


def test_record_name_with_newline_stays_one_line(samples_dir: Path, tmp_path: Path) -> None:
    prefix, records = _zip_records(samples_dir / "mlp.pt")
    records[prefix + "data/evil\nname"] = b"x" * 100
    path = tmp_path / "bad.pt"
    _write_zip(path, records, zipfile.ZIP_DEFLATED)
    assert_one_line_error(run_limited("list", path), "compressed")


def test_top_level_key_with_newline_stays_one_line(samples_dir: Path, tmp_path: Path) -> None:
    """The 'no state dict found (top-level keys: ...)' message quotes keys from the file."""
    path = tmp_path / "bad.pt"
    _pickle(b"\x80\x02}X\x09\x00\x00\x00line\nnextK\x01s.")(samples_dir, path)
    assert_one_line_error(run_limited("list", path), "no state dict")


def test_storage_key_with_newline_stays_one_line(samples_dir: Path, tmp_path: Path) -> None:
    """'missing data record for storage KEY' quotes a key taken from the pickle."""
    path = tmp_path / "bad.pt"
    _pickle_edit(b"X\x01\x00\x00\x000", b"X\x03\x00\x00\x000\n1")(samples_dir, path)
    assert_one_line_error(run_limited("list", path), "missing data record")


# =======================================================================================
# pickle bombs: tiny files that would hang, crash or allocate without the VM's bounds


def _bomb(body: bytes) -> PtCase:
    return _pickle(b"\x80\x02" + body + b".")


def _u(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


BOMB = "far more data than it holds"
BYTEARRAY = "unsupported bytearray"
BOMBS: dict[str, tuple[PtCase, str]] = {
    # (((...),),) a million deep as a dict key: CPython's tuple hash recursion segfaults.
    "deep-tuple-key": (_bomb(b"}" + b")" + b"\x85" * 1_000_000 + b"K\x01s"), "nests tuples"),
    # t = (t, t) eighty times: a 90-byte key whose hash takes 2**80 steps.
    "exponential-tuple-key": (_bomb(b"})q\x000" + b"h\x00h\x00\x86q\x000" * 80
                                    + b"h\x00K\x01s"), BOMB),
    # the same as a set member and inside an OrderedDict built from a list of pairs
    "exponential-frozenset": (_bomb(b")q\x000" + b"h\x00h\x00\x86q\x000" * 80
                                    + b"(h\x00\x91"), BOMB),
    "exponential-ordereddict-pairs": (_bomb(
        b")q\x000" + b"h\x00h\x00\x86q\x000" * 80
        + b"ccollections\nOrderedDict\n]q\x01h\x00K\x01\x86a\x85R"), BOMB),
    # bytearray(2**30) is one REDUCE away from a gigabyte.
    "bytearray-size": (_bomb(b"cbuiltins\nbytearray\nJ\x00\x00\x00\x40\x85R"), BYTEARRAY),
    "bytearray-huge-size": (_bomb(b"cbuiltins\nbytearray\n\x8a\x08" + b"\xff" * 7
                                  + b"\x7f\x85R"), BYTEARRAY),
    # copy a 100k-item dict 20k times: 2e9 entries from a 200 kB pickle.
    "ordereddict-copies": (_bomb(
        b"}q\x00(" + b"".join(b"J" + struct.pack("<i", i) + b"N" for i in range(100_000))
        + b"u" + b"ccollections\nOrderedDict\nq\x01" + b"0h\x01h\x00\x85R" * 20_000), BOMB),
    # torch.device(str(big list)) repeated
    "device-of-list": (_bomb(b"ctorch\ndevice\n]\x85R"), "malformed torch.device"),
    # encode a 100 kB string 20k times
    "encode-copies": (_bomb(_u("x" * 100_000) + b"q\x00" + b"c_codecs\nencode\nq\x01"
                            + (b"0h\x01h\x00" + _u("latin1") + b"\x86R") * 20_000), BOMB),
    # A global is only a name (never imported): a bare one is no state dict, said in a
    # bounded line.
    "global-name-with-newlines": (_pickle(b"\x80\x04\x8c\x02os\x8c\x0bsys\ntem\nbad\x93."),
                                  "no state dict"),
    "huge-global-name": (_bomb(b"cos\n" + b"s" * 1_000_000 + b"\n"), "no state dict"),
    "bytearray-encoding-with-newline": (_bomb(b"cbuiltins\nbytearray\n" + _u("x")
                                              + _u("nope\nnope") + b"\x86R"), BYTEARRAY),
    "huge-int-shape": (_pickle_edit(b"K\x20K\x10\x86",
                                    b"\x8b" + struct.pack("<i", 1 << 20) + b"\x01" * (1 << 20)
                                    + b"K\x10\x86"), "int64"),
}


@pytest.mark.parametrize("name", list(BOMBS))
def test_pickle_bomb(name: str, samples_dir: Path, tmp_path: Path) -> None:
    make, needle = BOMBS[name]
    path = tmp_path / "bomb.pt"
    make(samples_dir, path)
    line = assert_one_line_error(run_limited("list", path, timeout=30), needle)
    assert len(line) < 1000


def test_exponential_frozenset_payload_shape() -> None:
    """Sanity check of the bomb builder: the real unpickler agrees it is well formed."""
    import pickle

    tiny = b"\x80\x02)q\x000" + b"h\x00h\x00\x86q\x000" * 3 + b"(h\x00\x91."
    assert len(next(iter(pickle.loads(tiny)))) == 2


# =======================================================================================
# GGUF (headers no writer would produce, built field by field)


def _u32(v: int) -> bytes:
    return struct.pack("<I", v)


def _u64(v: int) -> bytes:
    return struct.pack("<Q", v)


G_U8, G_U32, G_U64, G_STRING, G_ARRAY = 0, 4, 10, 8, 9
F32, Q4_0 = 0, 2
W = gguf_tensor("w", (2,), F32, 0)  # 8 bytes at offset 0
DATA = b"\0" * 32


def _g(*kvs: bytes, tensors: tuple[bytes, ...] = (W,), data: bytes = DATA, **kw: int) -> bytes:
    return gguf_bytes(kvs, tensors, data, **kw)


def _nested(levels: int) -> bytes:
    """An array of one array of one array ... ``levels`` deep, then an empty uint8 array."""
    return (_u32(G_ARRAY) + _u64(1)) * (levels - 1) + _u32(G_U8) + _u64(0)


_STRINGS = gguf_kv("tokenizer.ggml.tokens", G_ARRAY,
                   _u32(G_STRING) + _u64(3) + gguf_str("a") + gguf_str("b"))

GGUF_CASES: dict[str, tuple[bytes, str]] = {
    # name: (file bytes, text the error must contain)
    "empty-file": (b"", "empty"),
    "two-bytes-of-magic": (b"GG", "too short"),
    "magic-only": (b"GGUF", "too short"),
    "bad-magic": (b"GGML" + _g()[4:], "not a GGUF file"),
    "a-safetensors-file": (st_bytes({"w": _t()}, b"\0" * 8), "not a GGUF file"),
    "version-1": (_g(version=1), "version 1"),
    "version-4": (_g(version=4), "version 4 is not supported"),
    "version-2**32-1": (_g(version=2**32 - 1), "is not supported"),
    "counts-truncated": (b"GGUF" + _u32(3) + _u64(1) + b"\0\0", "runs past the end"),
    "tensor-count-2**40": (_g(n_tensors=2**40), "over paramctl's limit"),
    "tensor-count-2**64-1": (_g(n_tensors=2**64 - 1), "over paramctl's limit"),
    "tensor-count-1000": (_g(n_tensors=1000), "the tensor count"),
    "kv-count-2**60": (_g(n_kv=2**60), "metadata key count"),
    "key-length-2**60": (_g(gguf_str("k", length=2**60) + _u32(G_U32) + _u32(1)),
                         "runs past the end"),
    "key-length-2**64-1": (_g(gguf_str("k", length=2**64 - 1)), "runs past the end"),
    "key-not-utf8": (_g(gguf_kv(b"\xff\xfe", G_U32, _u32(1))), "not valid UTF-8"),
    "duplicate-key": (_g(gguf_kv("a", G_U32, _u32(1)), gguf_kv("a", G_U32, _u32(2))),
                      "duplicate metadata key 'a'"),
    "value-type-99": (_g(gguf_kv("a", 99, b"")), "unknown value type 99"),
    "100k-character-key-quoted-short": (_g(gguf_kv("k" * 100_000, 99, b"")),
                                        "kkk...' has unknown value type 99"),
    "general-string-2**60": (_g(gguf_kv("general.name", G_STRING, gguf_str("x", length=2**60))),
                             "'general.name'"),
    "skipped-string-2**60": (_g(gguf_kv("tokenizer.chat_template", G_STRING,
                                        gguf_str("x", length=2**60))), "runs past the end"),
    "array-of-2**60-bytes": (_g(gguf_kv("a", G_ARRAY, _u32(G_U8) + _u64(2**60))), "items"),
    "array-of-2**40-strings": (_g(gguf_kv("tokenizer.ggml.tokens", G_ARRAY,
                                          _u32(G_STRING) + _u64(2**40))), "items"),
    "array-of-2**64-1-arrays": (_g(gguf_kv("a", G_ARRAY, _u32(G_ARRAY) + _u64(2**64 - 1))),
                                "items"),
    "string-array-short-by-one": (_g(_STRINGS, tensors=(), data=b"", alignment=1),
                                  "runs past the end"),
    "string-in-array-2**60": (_g(gguf_kv("tokenizer.ggml.tokens", G_ARRAY, _u32(G_STRING)
                                         + _u64(2) + gguf_str("a") + gguf_str("b", length=2**60))),
                              "runs past the end"),
    "arrays-nested-9-deep": (_g(gguf_kv("general.deep", G_ARRAY, _nested(9))), "nests arrays"),
    "skipped-arrays-nested-100-deep": (_g(gguf_kv("x.deep", G_ARRAY, _nested(100))),
                                       "nests arrays"),
    "array-item-type-13": (_g(gguf_kv("a", G_ARRAY, _u32(13) + _u64(1))),
                           "unknown value type 13"),
    "alignment-not-uint32": (_g(gguf_kv("general.alignment", G_U64, _u64(32))),
                             "general.alignment is not a uint32"),
    "alignment-zero": (_g(gguf_kv("general.alignment", G_U32, _u32(0))), "power of two"),
    "alignment-three": (_g(gguf_kv("general.alignment", G_U32, _u32(3))), "power of two"),
    "n-dims-1000": (_g(tensors=(gguf_tensor("w", (2,), F32, 0, n_dims=1000),)),
                    "1000 dimensions"),
    "n-dims-5": (_g(tensors=(gguf_tensor("w", (1, 1, 1, 1, 2), F32, 0),)), "5 dimensions"),
    "n-dims-2**32-1": (_g(tensors=(gguf_tensor("w", (2,), F32, 0, n_dims=2**32 - 1),)),
                       "dimensions"),
    "ggml-type-99": (_g(tensors=(gguf_tensor("w", (2,), 99, 0),)), "unknown ggml type 99"),
    "ggml-type-4-removed": (_g(tensors=(gguf_tensor("w", (32,), 4, 0),)),
                            "unknown ggml type 4"),
    "shape-product-over-int64": (_g(tensors=(gguf_tensor("w", (2**62, 2**62), F32, 0),)),
                                 "impossible shape"),
    "shape-2**64-1": (_g(tensors=(gguf_tensor("w", (2**64 - 1,), F32, 0),)), "impossible shape"),
    "quant-row-not-a-block": (_g(tensors=(gguf_tensor("w", (33, 1), Q4_0, 0),)),
                              "not a multiple of the Q4_0 block size 32"),
    "tensor-name-length-2**60": (_g(tensors=(gguf_str("w", length=2**60),)),
                                 "runs past the end"),
    "tensor-name-not-utf8": (_g(tensors=(gguf_tensor(b"\xc3(", (2,), F32, 0),)),
                             "not valid UTF-8"),
    "duplicate-tensor-name": (_g(tensors=(W, gguf_tensor("w", (2,), F32, 32)), data=DATA * 2),
                              "duplicate tensor name 'w'"),
    "offset-past-the-end": (_g(tensors=(gguf_tensor("w", (2,), F32, 32),)),
                            "runs past the end of the file"),
    "offset-2**63": (_g(tensors=(gguf_tensor("w", (2,), F32, 2**63),)),
                     "runs past the end of the file"),
    "offset-not-aligned": (_g(tensors=(gguf_tensor("w", (2,), F32, 4),)), "alignment 32"),
    "data-far-larger-than-file": (_g(tensors=(gguf_tensor("w", (2**40,), F32, 0),)),
                                  "runs past the end of the file"),
    "tensors-overlap": (_g(tensors=(gguf_tensor("a", (16,), F32, 0),
                                    gguf_tensor("b", (8,), F32, 32)), data=DATA * 2),
                        "overlap"),
    "same-bytes-twice": (_g(tensors=(gguf_tensor("a", (2,), F32, 0),
                                     gguf_tensor("b", (2,), F32, 0))), "overlap"),
    "truncated-in-tensor-infos": (_g(data=b"")[:-40], "runs past the end"),
    "truncated-data": (_g(data=b"\0" * 4), "runs past the end of the file"),
    "name-with-newline": (_g(tensors=(gguf_tensor("a\nb", (2,), 99, 0),)),
                          "unknown ggml type"),
}


@pytest.mark.parametrize("name", list(GGUF_CASES))
def test_malformed_gguf(name: str, tmp_path: Path) -> None:
    data, needle = GGUF_CASES[name]
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    line = assert_one_line_error(run_limited("list", path, timeout=30), needle)
    assert str(path) in line
    assert len(line) < len(str(path)) + 200


def test_gguf_builder_makes_a_valid_file(tmp_path: Path) -> None:
    """Control: the unbroken file the cases above start from lists."""
    path = tmp_path / "good.gguf"
    path.write_bytes(_g(_STRINGS[:-len(gguf_str("b"))] + gguf_str("b") + gguf_str("c")))
    result = run_limited("list", path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "w\t2\tfloat32\t2\ttrue\t\n"


@pytest.mark.parametrize("name", ["tensor-count-2**40", "array-of-2**40-strings",
                                  "tensors-overlap", "truncated-data"])
def test_malformed_gguf_rewrite_refused(name: str, tmp_path: Path) -> None:
    """A write command reads the file first: the same one-line error, exit 1."""
    data, needle = GGUF_CASES[name]
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    assert_one_line_error(run_limited("freeze", path, "*"), needle)
    assert path.read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["bad.gguf"]


def _sparse(path: Path, head: bytes, size: int) -> None:
    with open(path, "wb") as fh:
        fh.write(head)
        fh.truncate(size)


def test_gguf_metadata_limit(tmp_path: Path) -> None:
    """A 100 MB string array that the file really holds (sparse: zero-length strings) is
    refused at the 64 MiB metadata bound, before reading it."""
    path = tmp_path / "big.gguf"
    head = gguf_bytes([gguf_kv("tokenizer.ggml.tokens", G_ARRAY,
                               _u32(G_STRING) + _u64(12_500_000))], alignment=1)
    _sparse(path, head, 200_000_000)
    assert_one_line_error(run_limited("list", path, memory=512 << 20, timeout=30),
                          "past its 64 MiB limit")


def test_gguf_worst_case_metadata_is_bounded(tmp_path: Path) -> None:
    """Just under the bound: 8 million empty strings (64 MiB of zero lengths) are walked,
    in bounded time and memory, and the header then ends where the file does."""
    path = tmp_path / "walk.gguf"
    n = (64 << 20) // 8 - 64
    head = gguf_bytes([gguf_kv("tokenizer.ggml.tokens", G_ARRAY, _u32(G_STRING) + _u64(n))],
                      n_tensors=1, alignment=1)
    _sparse(path, head, len(head) + 8 * n)
    assert_one_line_error(run_limited("list", path, memory=512 << 20, timeout=60),
                          "the tensor count")


# =======================================================================================
# other kinds of source


def test_directory_named_like_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "dir.pt").mkdir()
    assert_one_line_error(run_limited("list", tmp_path / "dir.pt"))


def test_missing_file(tmp_path: Path) -> None:
    assert_one_line_error(run_limited("list", tmp_path / "nope.safetensors"), "no such file")


def test_unreadable_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    # Opening a FIFO for reading blocks until a writer appears: paramctl must not hang.
    result = run_limited("list", fifo, timeout=10)
    assert_one_line_error(result)
