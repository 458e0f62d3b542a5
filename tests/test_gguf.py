"""GGUF (llama.cpp) files: listed from the header, without torch or numpy; never written.

Every file here is written by llama.cpp's own Python writer (``gguf.GGUFWriter``) and
checked against what its reader (``gguf.GGUFReader``) and the numpy arrays written say.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from helpers import (
    REPO,
    gguf_bytes,
    gguf_kv,
    gguf_str,
    gguf_tensor,
    one_error_line,
    run_cli,
    run_inproc,
)

from paramctl.core import inspect
from paramctl.errors import CorruptFileError, SourceError
from paramctl.model import FLOAT_DTYPES
from paramctl.sources.base import OpenOptions
from paramctl.sources.gguf import GGML_TYPES, GGUFSource

LAYERS = 3
VOCAB = 256
DIM = 64
TOKENS = [f"tok_{i}" for i in range(1000)] + ["<s>", "</s>", "line\nbreak", "é"]


@dataclass(frozen=True)
class Written:
    """One tensor as written: the numpy shape it stands for and the dtype paramctl shows."""

    shape: tuple[int, ...]
    dtype: str


def _quantised(rng: np.random.Generator, shape: tuple[int, ...], qtype: Q) -> np.ndarray:
    """Quantised with gguf-py where it can (Q8_0, Q4_0, BF16); the K-quants it only
    dequantises, so those are random blocks of the right byte shape."""
    try:
        return gguf.quants.quantize(rng.standard_normal(shape, dtype=np.float32), qtype)
    except NotImplementedError:
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        byte_shape = (*shape[:-1], shape[-1] // block * type_size)
        return rng.integers(0, 256, byte_shape, dtype=np.uint8)


def write_llama(path: Path, *, endian: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE,
                alignment: int | None = None) -> dict[str, Written]:
    """A small Llama-shaped GGUF: F32/F16/BF16, Q8_0, Q4_0, Q4_K and Q6_K tensors, integer
    and float64 ones, a 3-D expert tensor, general.* keys and a tokenizer vocabulary."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama", endianess=endian)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_name("Tiny Llama")
    w.add_quantization_version(2)
    w.add_file_type(7)
    w.add_float32("general.sampling.temp", 0.7)
    w.add_array("general.tags", ["text-generation", "test"])
    w.add_array("general.long_list", list(range(100)))
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_tokenizer_model("llama")
    w.add_token_list(TOKENS)
    w.add_token_scores([float(i) for i in range(len(TOKENS))])
    w.add_token_types([1] * len(TOKENS))
    written: dict[str, Written] = {}

    def add(name: str, array: np.ndarray, shape: tuple[int, ...], dtype: str,
            raw: Q | None = None) -> None:
        w.add_tensor(name, array, raw_dtype=raw)
        written[name] = Written(shape, dtype)

    add("token_embd.weight", rng.standard_normal((VOCAB, DIM)).astype(np.float16),
        (VOCAB, DIM), "float16")
    for i in range(LAYERS):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", np.ones(DIM, np.float32), (DIM,), "float32")
        add(p + "attn_q.weight", _quantised(rng, (DIM, DIM), Q.BF16), (DIM, DIM), "bfloat16",
            Q.BF16)
        add(p + "attn_k.weight", _quantised(rng, (32, DIM), Q.Q8_0), (32, DIM), "Q8_0",
            Q.Q8_0)
        add(p + "attn_v.weight", _quantised(rng, (32, DIM), Q.Q4_0), (32, DIM), "Q4_0",
            Q.Q4_0)
        add(p + "ffn_up.weight", _quantised(rng, (96, 256), Q.Q4_K), (96, 256), "Q4_K",
            Q.Q4_K)
        add(p + "ffn_down.weight", _quantised(rng, (DIM, 512), Q.Q6_K), (DIM, 512), "Q6_K",
            Q.Q6_K)
    add("blk.0.ffn_up_exps.weight", _quantised(rng, (4, 16, DIM), Q.Q8_0), (4, 16, DIM),
        "Q8_0", Q.Q8_0)
    add("rope_freqs.weight", rng.standard_normal(8), (8,), "float64")
    add("blk.0.layer_ids", np.arange(6, dtype=np.int32).reshape(2, 3), (2, 3), "int32")
    add("blk.0.mask", np.zeros((3, 5), np.int8), (3, 5), "int8")
    add("output_norm.weight", np.ones(DIM, np.float32), (DIM,), "float32")
    add("output.weight", _quantised(rng, (VOCAB, DIM), Q.Q8_0), (VOCAB, DIM), "Q8_0", Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Written]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return path, write_llama(path)


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> str:
    res = run_inproc(capsys, *args)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    return res.stdout


# -- what is listed ----------------------------------------------------------------------------
def test_names_shapes_and_dtypes_are_what_was_written(
        llama: tuple[Path, dict[str, Written]]) -> None:
    path, written = llama
    inv = inspect(str(path))
    assert inv.format == "gguf"
    assert [p.name for p in inv.params] == list(written)
    for p in inv.params:
        assert (p.shape, p.dtype) == (written[p.name].shape, written[p.name].dtype), p.name
        assert p.numel == int(np.prod(written[p.name].shape))


def test_every_tensor_agrees_with_gguf_reader(llama: tuple[Path, dict[str, Written]]) -> None:
    path, _ = llama
    reader = gguf.GGUFReader(path)
    params = inspect(str(path)).params
    assert len(params) == len(reader.tensors)
    for p, t in zip(params, reader.tensors, strict=True):
        assert p.name == t.name
        assert p.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
        assert p.numel == t.n_elements
        assert p.nbytes == t.n_bytes
        name = t.tensor_type.name
        expected = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
                    "I8": "int8", "I32": "int32"}.get(name, name)
        assert p.dtype == expected


def test_a_numpy_shape_round_trips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """GGUF stores ne[0] (a row's length) first; paramctl shows the numpy/torch order."""
    path = tmp_path / "shape.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor("a", np.zeros((3, 5), np.float32))
    w.add_tensor("b", np.zeros((2, 3, 7), np.float16))
    w.add_tensor("q", gguf.quants.quantize(np.zeros((5, 64), np.float32), Q.Q8_0),
                 raw_dtype=Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert cli(capsys, "list", path, "-f", "tsv") == (
        "a\t3x5\tfloat32\t15\ttrue\t\n"
        "b\t2x3x7\tfloat16\t42\ttrue\t\n"
        "q\t5x64\tQ8_0\t320\tfalse\t\n")


@pytest.mark.parametrize("variant", ["big-endian", "alignment-64", "version-2"])
def test_other_valid_layouts(tmp_path: Path, variant: str,
                             llama: tuple[Path, dict[str, Written]]) -> None:
    path = tmp_path / f"{variant}.gguf"
    if variant == "big-endian":
        written = write_llama(path, endian=gguf.GGUFEndian.BIG)
    elif variant == "alignment-64":
        written = write_llama(path, alignment=64)
    else:  # v2 has v3's layout (v3 only added big-endian files)
        data = bytearray(llama[0].read_bytes())
        data[4:8] = (2).to_bytes(4, "little")
        path.write_bytes(bytes(data))
        written = llama[1]
    source = GGUFSource(str(path), OpenOptions())
    assert [(p.name, p.shape, p.dtype) for p in source.params()] == [
        (name, w.shape, w.dtype) for name, w in written.items()]
    expected = {"big-endian": (3, "big", 32), "alignment-64": (3, "little", 64),
                "version-2": (2, "little", 32)}[variant]
    header = source.header
    assert (header.version, header.byte_order, header.alignment) == expected
    reader = gguf.GGUFReader(path)
    assert header.data_start == reader.data_offset
    assert [header.data_start + t.offset for t in header.tensors] == [
        t.data_offset for t in reader.tensors]


def test_type_table_is_ggml_quant_sizes() -> None:
    """The table copied into paramctl equals the installed gguf-py's (ids, sizes, names)."""
    plain = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
             "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64"}
    theirs = {int(t): (plain.get(t.name, t.name), *gguf.GGML_QUANT_SIZES[t])
              for t in gguf.GGMLQuantizationType}
    assert theirs == GGML_TYPES


# -- metadata ----------------------------------------------------------------------------------
def test_json_has_the_general_metadata(llama: tuple[Path, dict[str, Written]],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    path, written = llama
    doc = json.loads(cli(capsys, "list", path, "-f", "json"))
    assert list(doc) == ["source", "format", "metadata", "parameters", "totals"]
    assert doc["format"] == "gguf"
    assert doc["metadata"] == {
        "general.architecture": "llama",
        "general.name": "Tiny Llama",
        "general.quantization_version": 2,
        "general.file_type": 7,
        "general.sampling.temp": 0.7,  # a float32, shown as written
        "general.tags": ["text-generation", "test"],
        "general.long_list": {"item_type": "int32", "length": 100},
    }
    assert [p["name"] for p in doc["parameters"]] == list(written)
    q = next(p for p in doc["parameters"] if p["name"] == "blk.0.attn_k.weight")
    assert q == {"name": "blk.0.attn_k.weight", "shape": [32, DIM], "dtype": "Q8_0",
                 "numel": 32 * DIM, "bytes": 32 * DIM // 32 * 34, "requires_grad": False,
                 "tied": None, "buffer": False}


def test_metadata_reaches_the_inventory_only_for_gguf(
        llama: tuple[Path, dict[str, Written]], samples_dir: Path) -> None:
    assert inspect(str(llama[0])).metadata is not None
    assert inspect(str(samples_dir / "mlp.safetensors")).metadata is None
    assert inspect(str(samples_dir / "mlp.pt")).metadata is None


# -- trainable, frozen and totals ----------------------------------------------------------------
def test_quantised_tensors_are_neither_trainable_nor_frozen(
        llama: tuple[Path, dict[str, Written]], capsys: pytest.CaptureFixture[str]) -> None:
    path, written = llama
    reader = gguf.GGUFReader(path)
    doc = json.loads(cli(capsys, "list", path, "-f", "json"))
    floats = {n for n, w in written.items() if w.dtype in FLOAT_DTYPES}
    assert {p["name"] for p in doc["parameters"] if p["requires_grad"]} == floats
    numel = {n: int(np.prod(w.shape)) for n, w in written.items()}
    assert doc["totals"]["numel"] == sum(numel.values())
    assert doc["totals"]["trainable"] == sum(numel[n] for n in floats)
    assert doc["totals"]["frozen"] == 0
    assert doc["totals"]["bytes"] == sum(t.n_bytes for t in reader.tensors)
    assert doc["totals"]["by_dtype"]["Q8_0"] == sum(
        t.n_bytes for t in reader.tensors if t.tensor_type == Q.Q8_0)
    trainable = cli(capsys, "list", path, "--trainable", "-f", "names").split()
    assert set(trainable) == floats
    assert cli(capsys, "list", path, "--frozen", "-f", "names") == ""


def test_tree_tsv_names_and_table(llama: tuple[Path, dict[str, Written]],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    path, written = llama
    assert cli(capsys, "list", path, "-f", "names").split() == list(written)
    tsv = cli(capsys, "list", path, "-f", "tsv").splitlines()
    assert tsv[1] == "blk.0.attn_norm.weight\t64\tfloat32\t64\ttrue\t"
    assert "blk.0.ffn_up.weight\t96x256\tQ4_K\t24576\tfalse\t" in tsv
    tree = cli(capsys, "list", path, "--tree", "--depth", "2", "-f", "tsv").splitlines()
    rows = {line.split("\t")[0]: line.split("\t")[1:] for line in tree}
    assert list(rows)[:3] == ["(all)", "token_embd", "blk"]
    # blk.1 holds a float32 norm and a bf16 q (trainable) beside quantised weights
    assert rows["blk.1"][2] == "yes"
    assert rows["output"][2] == "-"  # Q8_0 only: never trainable, never frozen
    table = cli(capsys, "list", path, "-f", "table", "--width", "120")
    assert "Q4_K" in table and "trainable" in table and "frozen 0 " in table


def test_list_imports_neither_torch_nor_numpy(llama: tuple[Path, dict[str, Written]]) -> None:
    script = (
        "import os, sys, runpy\n"
        # `list` leaves with os._exit (no interpreter teardown); the probe has more to do.
        "def _exit(code):\n"
        "    raise SystemExit(code)\n"
        "os._exit = _exit\n"
        f"sys.argv = ['paramctl', 'list', {str(llama[0])!r}, '-f', 'json']\n"
        "try:\n"
        "    runpy.run_module('paramctl', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'gguf'))\n"
        "sys.stderr.write('RESULT %r %r\\n' % (code, heavy[:5]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                          timeout=60)
    assert proc.stderr.strip().splitlines()[-1] == "RESULT 0 []", proc.stderr
    assert json.loads(proc.stdout)["format"] == "gguf"


# -- read-only ---------------------------------------------------------------------------------
READ_ONLY = "GGUF files are read-only in paramctl; convert with llama.cpp's tools, or list only"


@pytest.mark.parametrize("args", [
    ["freeze", "{}", "*"],
    ["freeze", "{}", "*", "--dry-run"],
    ["unfreeze", "{}", "blk.0"],
    ["freeze", "{}", "*", "-o", "{}.safetensors"],
    ["init", "{}", "*.attn_norm.weight=ones"],
])
def test_writes_are_refused(llama: tuple[Path, dict[str, Written]], tmp_path: Path,
                            capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    path, _ = llama
    before = path.read_bytes()
    res = run_inproc(capsys, *(a.format(path) for a in args))
    assert res.returncode == 2, res.stderr
    assert one_error_line(res) == f"error: {path}: {READ_ONLY}"
    assert res.stdout == ""
    assert path.read_bytes() == before
    assert not list(path.parent.glob("*.safetensors"))


def test_a_file_of_only_quantised_tensors_is_refused_too(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing in it could change; the answer is still "read-only", not "nothing to do"."""
    path = tmp_path / "q.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor("w", gguf.quants.quantize(np.ones((2, 32), np.float32), Q.Q8_0),
                 raw_dtype=Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    res = run_inproc(capsys, "freeze", path, "*")
    assert res.returncode == 2
    assert READ_ONLY in one_error_line(res)


def test_key_option_refused(llama: tuple[Path, dict[str, Written]]) -> None:
    with pytest.raises(SourceError, match="--key applies to torch checkpoints"):
        inspect(str(llama[0]), options=OpenOptions(key="model"))


def test_load_state_dict_says_it_cannot(llama: tuple[Path, dict[str, Written]]) -> None:
    from torch import nn

    import paramctl

    with pytest.raises(SourceError, match="not a checkpoint file paramctl can load tensors from"):
        paramctl.load_state_dict(nn.Linear(2, 2), llama[0])


# -- the parser's own bounds -------------------------------------------------------------------
def test_a_real_size_vocabulary_lists_quickly(tmp_path: Path) -> None:
    """A 128k-token vocabulary and 280k merges (Llama 3's) are skipped, not decoded: this
    is about the parser's algorithm (no per-string objects), not a timing assertion."""
    path = tmp_path / "vocab.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("vocab")
    w.add_token_list([f"t{i}" for i in range(128_256)])
    w.add_token_merges([f"a b{i}" for i in range(280_147)])
    w.add_tensor("w", np.zeros((2, 2), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    source = GGUFSource(str(path), OpenOptions())
    assert source.metadata() == {"general.architecture": "llama", "general.name": "vocab"}
    assert [p.name for p in source.params()] == ["w"]


def test_corrupt_is_a_source_error(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(CorruptFileError, match=r"x\.gguf: .* runs past the end of the file"):
        inspect(str(path))


def test_every_metadata_value_type(tmp_path: Path) -> None:
    """Each GGUF value type, nested arrays included, as JSON shows it; keys outside
    general.* are walked but not kept."""
    def kv(key: str, vtype: int, fmt: str, *values: object) -> bytes:
        return gguf_kv(key, vtype, struct.pack("<" + fmt, *values))

    nested = (struct.pack("<IQ", 9, 2) + struct.pack("<IQ", 4, 2) + struct.pack("<2I", 1, 2)
              + struct.pack("<IQ", 4, 1) + struct.pack("<I", 3))
    kvs = [
        kv("general.u8", 0, "B", 255), kv("general.i8", 1, "b", -1),
        kv("general.u16", 2, "H", 65535), kv("general.i16", 3, "h", -2),
        kv("general.u32", 4, "I", 2**32 - 1), kv("general.i32", 5, "i", -3),
        kv("general.f32", 6, "f", 1e-5), kv("general.bool", 7, "?", True),
        kv("general.u64", 10, "Q", 2**64 - 1), kv("general.i64", 11, "q", -(2**63)),
        kv("general.f64", 12, "d", 0.1), kv("general.nan", 12, "d", float("nan")),
        kv("general.inf", 6, "f", float("-inf")),
        gguf_kv("general.text", 8, gguf_str(b"caf\xc3\xa9 \xff")),
        gguf_kv("general.nested", 9, nested),
        gguf_kv("general.empty", 9, struct.pack("<IQ", 8, 0)),
        kv("llama.block_count", 4, "I", 32),
        gguf_kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2) + gguf_str("a")
                + gguf_str("b")),
    ]
    path = tmp_path / "types.gguf"
    path.write_bytes(gguf_bytes(kvs, [gguf_tensor("w", (2,), 0, 0)], b"\0" * 8))
    assert GGUFSource(str(path), OpenOptions()).metadata() == {
        "general.u8": 255, "general.i8": -1, "general.u16": 65535, "general.i16": -2,
        "general.u32": 2**32 - 1, "general.i32": -3, "general.f32": 1e-5,
        "general.bool": True, "general.u64": 2**64 - 1, "general.i64": -(2**63),
        "general.f64": 0.1, "general.nan": "nan", "general.inf": "-inf",
        "general.text": "café \ufffd", "general.nested": [[1, 2], [3]], "general.empty": [],
    }
    reader = gguf.GGUFReader(path)  # the hand-built file is one gguf-py reads too
    assert reader.fields["general.nested"].types[0] == gguf.GGUFValueType.ARRAY
    assert [t.name for t in reader.tensors] == ["w"]


def test_stats_decodes_float_tensors_and_names_quantised_ones(
        llama: tuple[Path, dict[str, Written]]) -> None:
    import gguf

    path, _ = llama
    res = run_cli("stats", path, "-f", "json")
    assert res.returncode == 0, res.stderr
    rows = {r["name"]: r for r in json.loads(res.stdout)["tensors"]}
    reader = gguf.GGUFReader(path)
    for t in reader.tensors:
        row = rows[t.name]
        if row["dtype"] in ("float32", "float16", "float64", "int32", "int8"):
            values = np.asarray(t.data, dtype=np.float64).reshape(-1)
            assert row["min"] == pytest.approx(values.min(), rel=1e-12, abs=1e-12)
            assert row["mean"] == pytest.approx(values.mean(), rel=1e-9, abs=1e-12)
            assert row["zeros"] == int((values == 0).sum())
        elif row["dtype"] not in ("bfloat16",):
            assert row["min"] is None and "not decoded" in row["note"], row
