"""``paramctl list`` agrees with torch itself, in every output format.

Checkpoints are compared with ``torch.load(weights_only=True)`` and ``safetensors.safe_open``;
module paths with ``named_parameters()`` / ``named_buffers()`` of the model built by torch.
The library is exercised through ``paramctl.core.inspect``; the CLI through a real
``python -m paramctl`` subprocess (``run_cli``, ``real=True`` below) where stdout, exit codes
and start-up matter, and otherwise in-process through Typer's ``CliRunner`` (same command
code, no interpreter and torch start-up per call).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import run_cli
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from paramctl.cli import app
from paramctl.core import inspect
from paramctl.model import BUFFER_NAMES, FLOAT_DTYPES, ParamInfo
from paramctl.sources.base import OpenOptions
from sample_models.cnn import SmallCNN
from sample_models.llama import Llama
from sample_models.mlp import MLP
from sample_models.transformer import TinyTransformer

REPO = Path(__file__).resolve().parent.parent
SAMPLES = ("mlp", "cnn", "transformer", "llama")
EXTS = ("pt", "safetensors")

# DESIGN.md's stable JSON shape. "buffer" is an addition documented in README.md.
DOC_KEYS = {"source", "format", "parameters", "totals"}
PARAM_KEYS = {"name", "shape", "dtype", "numel", "bytes", "requires_grad", "tied", "buffer"}
TOTALS_KEYS = {"numel", "trainable", "frozen", "bytes", "by_dtype"}
TREE_KEYS = {"module", "depth", "numel", "bytes", "trainable"}

Sample = Callable[[str], Path]


# -- what torch says ---------------------------------------------------------------------------
def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def can_train(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def identity(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(),
            t.dtype)


def records(tensors: list[tuple[str, torch.Tensor]], frozen: set[str], *,
            buffers: frozenset[str] = frozenset(),
            ident: Callable[[torch.Tensor], Any] = identity) -> list[dict[str, Any]]:
    """The JSON records paramctl should print for these named tensors."""
    groups: dict[Any, list[str]] = {}
    for name, t in tensors:
        groups.setdefault((name in buffers, ident(t)), []).append(name)
    out = []
    for name, t in tensors:
        others = [n for n in groups[(name in buffers, ident(t))] if n != name]
        out.append({
            "name": name,
            "shape": list(t.shape),
            "dtype": dtype_name(t),
            "numel": t.numel(),
            "bytes": t.numel() * t.element_size(),
            "requires_grad": can_train(t) and name not in frozen and name not in buffers,
            "tied": others or None,
            "buffer": name in buffers,
        })
    return out


def file_buffers(tensors: list[tuple[str, torch.Tensor]]) -> frozenset[str]:
    """A file's buffers: the names whose last part is a documented buffer name."""
    return frozenset(n for n, _ in tensors if n.rsplit(".", 1)[-1] in BUFFER_NAMES)


def torch_file_records(path: Path, key: str | None = None) -> list[dict[str, Any]]:
    """Records for a checkpoint as torch reads it (file order for .pt)."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = [(k, f.get_tensor(k)) for k in f.keys()]  # noqa: SIM118
        frozen = set(json.loads(meta.get("paramctl.frozen", "[]")))
        return records(tensors, frozen, buffers=file_buffers(tensors))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    state = obj[key] if key is not None else obj
    tensors = [(str(k), v) for k, v in state.items() if isinstance(v, torch.Tensor)]
    frozen = {k for k, v in tensors if isinstance(v, nn.Parameter) and not v.requires_grad}
    return records(tensors, frozen, buffers=file_buffers(tensors))


def module_records(model: nn.Module, *, buffers: bool = False) -> list[dict[str, Any]]:
    params: list[tuple[str, torch.Tensor]] = list(
        model.named_parameters(remove_duplicate=False))
    frozen = {n for n, p in params if not p.requires_grad}
    tensors = params
    names_b: frozenset[str] = frozenset()
    if buffers:
        bufs = list(model.named_buffers(remove_duplicate=False))
        tensors = params + bufs
        names_b = frozenset(n for n, _ in bufs)
    # meta tensors have no storage address: a tie is the same Parameter object
    return records(tensors, frozen, buffers=names_b, ident=id)


def expected_totals(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals counting every tied group once."""
    seen: set[str] = set()
    numel = trainable = frozen = nbytes = 0
    by_dtype: dict[str, int] = {}
    for r in recs:
        if any(t in seen for t in r["tied"] or ()):
            continue
        seen.add(r["name"])
        numel += r["numel"]
        nbytes += r["bytes"]
        by_dtype[r["dtype"]] = by_dtype.get(r["dtype"], 0) + r["bytes"]
        # Buffers and integer tensors are neither trainable nor frozen.
        if r["buffer"] or r["dtype"] not in FLOAT_DTYPES:
            continue
        if r["requires_grad"]:
            trainable += r["numel"]
        else:
            frozen += r["numel"]
    return {"numel": numel, "trainable": trainable, "frozen": frozen, "bytes": nbytes,
            "by_dtype": by_dtype}


def by_name(recs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for r in recs:
        r = dict(r)
        if r["tied"]:
            r["tied"] = sorted(r["tied"])
        out[r["name"]] = r
    return out


def info_record(p: ParamInfo) -> dict[str, Any]:
    return {"name": p.name, "shape": list(p.shape), "dtype": p.dtype, "numel": p.numel,
            "bytes": p.nbytes, "requires_grad": p.requires_grad,
            "tied": list(p.tied) if p.tied else None, "buffer": p.buffer}


# -- running paramctl --------------------------------------------------------------------------
def ok(*args: str | Path, real: bool = False) -> str:
    """Run paramctl and return its stdout.

    ``real=True`` runs ``python -m paramctl`` in a subprocess (real stdout, real exit
    path). Otherwise the Typer app runs in this process through ``CliRunner``: the same
    command code, without a second of interpreter and torch start-up per call.
    """
    if not real:
        res = CliRunner().invoke(app, [str(a) for a in args])
        assert res.exit_code == 0, (res.stderr, res.exception)
        return res.stdout
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stdout


def list_json(*args: str | Path, real: bool = False) -> dict[str, Any]:
    doc = json.loads(ok("list", *args, "-f", "json", real=real))
    assert isinstance(doc, dict)
    return doc


def names_of(*args: str | Path, real: bool = False) -> list[str]:
    return ok("list", *args, "-f", "names", real=real).splitlines()


def assert_doc_shape(doc: dict[str, Any]) -> None:
    assert set(doc) == DOC_KEYS
    assert set(doc["totals"]) == TOTALS_KEYS
    for p in doc["parameters"]:
        assert set(p) == PARAM_KEYS, p
        assert isinstance(p["shape"], list)
        assert isinstance(p["requires_grad"], bool)
        assert p["tied"] is None or (isinstance(p["tied"], list) and p["tied"])


# -- checkpoints vs torch ----------------------------------------------------------------------
@pytest.mark.parametrize("ext", EXTS)
@pytest.mark.parametrize("model", SAMPLES)
def test_cli_json_matches_torch(samples_dir: Path, model: str, ext: str) -> None:
    path = samples_dir / f"{model}.{ext}"
    doc = list_json(path, real=True)
    assert_doc_shape(doc)
    assert doc["source"] == str(path)
    assert doc["format"] == ext
    expected = torch_file_records(path)
    if ext == "pt":
        assert doc["parameters"] == expected  # same order as the state dict
    else:
        assert by_name(doc["parameters"]) == by_name(expected)
        assert len(doc["parameters"]) == len(expected)
    assert doc["totals"] == expected_totals(expected)


@pytest.mark.parametrize("ext", EXTS)
@pytest.mark.parametrize("model", SAMPLES)
def test_inspect_matches_torch(samples_dir: Path, model: str, ext: str) -> None:
    path = samples_dir / f"{model}.{ext}"
    inv = inspect(str(path))
    assert inv.format == ext
    assert inv.source == str(path)
    got = [info_record(p) for p in inv.params]
    expected = torch_file_records(path)
    assert by_name(got) == by_name(expected)
    if ext == "pt":
        assert [p.name for p in inv.params] == [r["name"] for r in expected]


def test_file_requires_grad_semantics(samples_dir: Path) -> None:
    """Floats in a plain state dict are trainable, except buffers known by name
    (running_mean); num_batches_tracked (int64) is not trainable either way."""
    doc = list_json(samples_dir / "cnn.pt")
    flags = {p["name"]: p["requires_grad"] for p in doc["parameters"]}
    buffers = {p["name"] for p in doc["parameters"] if p["buffer"]}
    assert flags["features.1.num_batches_tracked"] is False
    assert flags["features.4.num_batches_tracked"] is False
    assert flags["features.1.running_mean"] is False  # a buffer, by its name
    assert buffers == {f"features.{i}.{b}" for i in (1, 4)
                       for b in ("running_mean", "running_var", "num_batches_tracked")}
    assert flags["classifier.weight"] is True
    assert doc["totals"]["frozen"] == 0  # buffers and integer tensors never train, nor are
    # they "frozen"


def test_tied_in_pt_file(samples_dir: Path) -> None:
    path = samples_dir / "transformer.pt"
    doc = list_json(path)
    params = {p["name"]: p for p in doc["parameters"]}
    assert params["embed.weight"]["tied"] == ["lm_head.weight"]
    assert params["lm_head.weight"]["tied"] == ["embed.weight"]
    assert sum(1 for p in doc["parameters"] if p["tied"]) == 2
    state = torch.load(path, map_location="cpu", weights_only=True)
    unique = {t.untyped_storage().data_ptr(): t for t in state.values()}
    assert doc["totals"]["numel"] == sum(t.numel() for t in unique.values())
    assert doc["totals"]["numel"] == sum(p["numel"] for p in doc["parameters"]) - 2048


def test_mixed_dtypes_match_torch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tensors = {
        "f64": torch.randn(2, 3, dtype=torch.float64),
        "f16": torch.randn(4, dtype=torch.float16),
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f8": torch.randn(4).to(torch.float8_e4m3fn),
        "c64": torch.randn(2, dtype=torch.complex64),
        "i8": torch.tensor([1, 2], dtype=torch.int8),
        "u8": torch.zeros(3, dtype=torch.uint8),
        "i16": torch.zeros(2, dtype=torch.int16),
        "i32": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "i64": torch.arange(3),
        "flag": torch.tensor([True, False]),
        "scalar": torch.tensor(3.0),
        "empty": torch.zeros(0, 4),
    }
    pt = tmp_path / "mixed.pt"
    big = torch.randn(6, 4)
    torch.save({**tensors, "transposed": torch.randn(3, 4).t(), "big": big, "rows": big[1:3],
                "column": big[:, 1], "same": big}, pt)
    st = tmp_path / "mixed.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(st))
    for path in (pt, st):
        doc = list_json(path)
        expected = torch_file_records(path)
        assert by_name(doc["parameters"]) == by_name(expected), path
        assert doc["totals"] == expected_totals(expected), path
    dtypes = {p["name"]: p["dtype"] for p in list_json(pt)["parameters"]}
    assert dtypes["bf16"] == "bfloat16"
    assert dtypes["f8"] == "float8_e4m3fn"
    assert dtypes["flag"] == "bool"


def test_saved_parameter_flags(tmp_path: Path) -> None:
    """A file that records Parameter objects (as keep_vars=True does) tells parameters from
    buffers itself: the plain tensors beside its Parameters are buffers (DESIGN)."""
    path = tmp_path / "params.pt"
    torch.save({
        "trainable": nn.Parameter(torch.ones(3)),
        "frozen": nn.Parameter(torch.ones(2), requires_grad=False),
        "plain": torch.ones(4),
        "steps": torch.zeros(1, dtype=torch.int64),
    }, path)
    doc = list_json(path)
    flags = {p["name"]: p["requires_grad"] for p in doc["parameters"]}
    assert flags == {"trainable": True, "frozen": False, "plain": False, "steps": False}
    assert [p["name"] for p in doc["parameters"] if p["buffer"]] == ["plain", "steps"]
    assert doc["totals"]["trainable"] == 3
    assert doc["totals"]["frozen"] == 2  # buffers and the int64 "steps" count as neither
    assert names_of(path, "--frozen") == ["frozen"]
    assert names_of(path, "--trainable") == ["trainable"]


# -- module paths vs torch ---------------------------------------------------------------------
MLP_FILE = f"{REPO}/sample_models/mlp.py:MLP"
MODULES: list[tuple[str, Callable[..., nn.Module], dict[str, Any]]] = [
    (MLP_FILE, MLP, {}),
    ("sample_models.mlp:make_mlp", MLP, {"depth": 3}),
    ("sample_models.cnn:SmallCNN", SmallCNN, {}),
    ("sample_models.transformer:TinyTransformer", TinyTransformer, {}),
    ("sample_models.llama:Llama", Llama, {}),
    ("sample_models.llama:Llama", Llama, {"tie_embeddings": True, "layers": 1}),
]


@pytest.mark.parametrize("buffers", [False, True])
@pytest.mark.parametrize(("spec", "build", "kwargs"), MODULES)
def test_inspect_module_matches_named_parameters(
        spec: str, build: Callable[..., nn.Module], kwargs: dict[str, Any],
        buffers: bool) -> None:
    inv = inspect(spec, options=OpenOptions(args=kwargs, buffers=buffers))
    assert inv.format == "module"
    with torch.device("meta"):
        model = build(**kwargs)
    expected = module_records(model, buffers=buffers)
    got = [info_record(p) for p in inv.params]
    assert [r["name"] for r in got] == [r["name"] for r in expected]
    assert by_name(got) == by_name(expected)


def test_cli_module_path_with_arg() -> None:
    doc = list_json("sample_models/mlp.py:MLP", "--arg", "hidden=64", "--arg", "depth=3",
                    real=True)
    assert_doc_shape(doc)
    assert doc["format"] == "module"
    assert doc["source"] == "sample_models/mlp.py:MLP"
    expected = module_records(MLP(hidden=64, depth=3))
    assert doc["parameters"] == expected
    assert doc["totals"] == expected_totals(expected)
    assert {tuple(p["shape"]) for p in doc["parameters"]} >= {(64, 16), (64, 64), (4, 64)}


def test_cli_module_path_buffers() -> None:
    plain = list_json("sample_models.cnn:SmallCNN")
    assert all(not p["buffer"] for p in plain["parameters"])
    assert [p["name"] for p in plain["parameters"]] == [
        n for n, _ in SmallCNN().named_parameters()]
    doc = list_json("sample_models.cnn:SmallCNN", "--buffers")
    assert_doc_shape(doc)
    expected = module_records(SmallCNN(), buffers=True)
    assert doc["parameters"] == expected
    buffers = {p["name"]: p for p in doc["parameters"] if p["buffer"]}
    assert set(buffers) == {n for n, _ in SmallCNN().named_buffers()}
    assert all(p["requires_grad"] is False for p in buffers.values())
    assert buffers["features.1.num_batches_tracked"]["dtype"] == "int64"
    assert buffers["features.1.num_batches_tracked"]["shape"] == []


def test_cli_module_tied_counted_once() -> None:
    doc = list_json("sample_models.transformer:TinyTransformer")
    params = {p["name"]: p for p in doc["parameters"]}
    assert params["embed.weight"]["tied"] == ["lm_head.weight"]
    assert params["lm_head.weight"]["tied"] == ["embed.weight"]
    model = TinyTransformer()
    unique_numel = sum(p.numel() for p in model.parameters())  # parameters() dedups ties
    assert doc["totals"]["numel"] == unique_numel
    assert doc["totals"]["trainable"] == unique_numel
    assert doc["totals"]["bytes"] == 4 * unique_numel
    assert len(doc["parameters"]) == len(list(model.named_parameters())) + 1


def test_module_frozen_parameter_inside_code(tmp_path: Path) -> None:
    src = tmp_path / "partly_frozen.py"
    src.write_text(textwrap.dedent("""
        from torch import nn

        def build():
            model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
            model[0].weight.requires_grad_(False)
            return model
    """))
    inv = inspect(f"{src}:build")
    flags = {p.name: p.requires_grad for p in inv.params}
    assert flags == {"0.weight": False, "0.bias": True, "1.weight": True, "1.bias": True}


# -- --weights, --trainable, --frozen ----------------------------------------------------------
def test_weights_with_frozen_checkpoint(sample: Sample) -> None:
    ckpt = sample("mlp.pt")
    ok("freeze", ckpt, "head")
    doc = list_json("sample_models/mlp.py:MLP", "--weights", ckpt, real=True)
    flags = {p["name"]: p["requires_grad"] for p in doc["parameters"]}
    assert flags == {"layers.0.weight": True, "layers.0.bias": True, "layers.1.weight": True,
                     "layers.1.bias": True, "head.weight": False, "head.bias": False}
    assert doc["totals"]["frozen"] == 4 * 32 + 4
    assert doc["totals"]["trainable"] == doc["totals"]["numel"] - (4 * 32 + 4)
    # and torch agrees that the checkpoint records exactly those as frozen Parameters
    state = torch.load(ckpt, weights_only=True)
    assert {k for k, v in state.items() if isinstance(v, nn.Parameter)
            and not v.requires_grad} == {"head.weight", "head.bias"}


def test_weights_with_frozen_safetensors_inspect(sample: Sample) -> None:
    ckpt = sample("cnn.safetensors")
    ok("freeze", ckpt, "features.0")
    inv = inspect("sample_models.cnn:SmallCNN", options=OpenOptions(weights=ckpt))
    frozen = [p.name for p in inv.params if not p.requires_grad]
    assert frozen == ["features.0.weight", "features.0.bias"]


def test_weights_trainable_and_frozen_filters(tmp_path: Path) -> None:
    ckpt = tmp_path / "weights.pt"
    state = MLP().state_dict()
    state["layers.0.weight"] = nn.Parameter(state["layers.0.weight"], requires_grad=False)
    torch.save(state, ckpt)
    assert names_of(MLP_FILE, "--weights", ckpt, "--frozen") == [
        "layers.0.weight"]
    assert names_of(MLP_FILE, "--weights", ckpt, "--trainable") == [
        "layers.0.bias", "layers.1.weight", "layers.1.bias", "head.weight", "head.bias"]


def test_trainable_and_frozen_filters_on_file(sample: Sample, samples_dir: Path) -> None:
    path = sample("transformer.pt")
    ok("freeze", path, "blocks.0", "embed")
    everything = names_of(path)
    frozen = names_of(path, "--frozen")
    trainable = names_of(path, "--trainable")
    state = torch.load(path, weights_only=True)
    torch_frozen = [k for k, v in state.items()
                    if isinstance(v, nn.Parameter) and not v.requires_grad]
    assert frozen == torch_frozen
    assert "lm_head.weight" in frozen  # tied to embed.weight, frozen with it
    assert all(n.startswith(("blocks.0.", "embed.", "lm_head.")) for n in frozen)
    assert trainable == [n for n in everything if n not in frozen]
    assert len(everything) == len(state)
    # untouched original still all trainable
    assert names_of(samples_dir / "transformer.pt", "--frozen") == []


def test_filters_combine_with_patterns(sample: Sample) -> None:
    path = sample("mlp.safetensors")
    ok("freeze", path, "*.bias")
    assert names_of(path, "layers", "--frozen") == ["layers.0.bias", "layers.1.bias"]
    assert names_of(path, "*.bias", "!head", "--trainable") == []


FILTER_CASES = [
    ("cnn.pt", []),
    ("transformer.pt", ["blocks.1"]),
    ("llama.safetensors", ["model.layers.0.mlp"]),
    ("sample_models.cnn:SmallCNN", ["--buffers"]),
]


@pytest.mark.parametrize(("source", "extra"), FILTER_CASES)
def test_totals_agree_with_filters(sample: Sample, source: str, extra: list[str]) -> None:
    """totals.trainable / totals.frozen are what --trainable / --frozen list."""
    if ":" in source:
        spec: str | Path = source
        args = extra
    else:
        spec = sample(source)
        if extra:
            ok("freeze", spec, *extra)
        args = []
    whole = list_json(spec, *args)["totals"]
    trainable = list_json(spec, *args, "--trainable")["totals"]
    frozen = list_json(spec, *args, "--frozen")["totals"]
    assert whole["trainable"] == trainable["numel"]
    assert whole["frozen"] == frozen["numel"]


# -- output formats ----------------------------------------------------------------------------
def tsv_line(r: dict[str, Any]) -> str:
    shape = "x".join(str(d) for d in r["shape"]) if r["shape"] else "scalar"
    return "\t".join([r["name"], shape, r["dtype"], str(r["numel"]),
                      "true" if r["requires_grad"] else "false", ",".join(r["tied"] or [])])


@pytest.mark.parametrize("name", ["cnn.pt", "transformer.safetensors", "llama.pt"])
def test_tsv_exact(samples_dir: Path, name: str) -> None:
    path = samples_dir / name
    out = ok("list", path, "-f", "tsv", real=True)
    expected = torch_file_records(path)
    lines = out.splitlines()
    if path.suffix == ".pt":
        assert lines == [tsv_line(r) for r in expected]
    else:
        assert sorted(lines) == sorted(tsv_line(r) for r in expected)
    assert out.endswith("\n")
    assert "\x1b" not in out
    for line in lines:
        fields = line.split("\t")
        assert len(fields) == 6
        assert fields[4] in ("true", "false")


def test_tsv_shapes_and_flags(samples_dir: Path, sample: Sample) -> None:
    out = ok("list", samples_dir / "cnn.pt", "-f", "tsv")
    rows = {line.split("\t")[0]: line.split("\t") for line in out.splitlines()}
    assert rows["features.3.weight"] == ["features.3.weight", "16x8x3x3", "float32", "1152",
                                         "true", ""]
    assert rows["classifier.weight"][1] == "10x16"
    assert rows["features.1.num_batches_tracked"][2:] == ["int64", "1", "false", ""]
    path = sample("mlp.pt")
    ok("freeze", path, "head.weight")
    lines = {line.split("\t")[0]: line for line in ok("list", path, "-f", "tsv").splitlines()}
    assert lines["head.weight"] == "head.weight\t4x32\tfloat32\t128\tfalse\t"
    assert lines["head.bias"] == "head.bias\t4\tfloat32\t4\ttrue\t"


def test_tsv_large_shape_text(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    save_file({"w": torch.zeros(2048, 2048, dtype=torch.int8)}, str(path))
    assert ok("list", path, "-f", "tsv") == "w\t2048x2048\tint8\t4194304\tfalse\t\n"


def test_tsv_headers(samples_dir: Path) -> None:
    path = samples_dir / "mlp.pt"
    plain = ok("list", path, "-f", "tsv").splitlines()
    with_headers = ok("list", path, "-f", "tsv", "--headers").splitlines()
    assert plain[0].startswith("layers.0.weight\t")
    assert with_headers[0] == "name\tshape\tdtype\tnumel\trequires_grad\ttied"
    assert with_headers[1:] == plain
    assert ok("list", path, "-f", "tsv", "--no-headers").splitlines() == plain


def test_default_format_when_piped_is_tsv(samples_dir: Path) -> None:
    path = samples_dir / "transformer.pt"
    assert ok("list", path, real=True) == ok("list", path, "-f", "tsv", real=True)


@pytest.mark.parametrize("name", ["cnn.pt", "transformer.pt", "llama.safetensors"])
def test_jsonl_and_names_agree_with_json(samples_dir: Path, name: str) -> None:
    path = samples_dir / name
    doc = list_json(path)
    jsonl = [json.loads(line) for line in ok("list", path, "-f", "jsonl").splitlines()]
    assert jsonl == doc["parameters"]
    for rec in jsonl:
        assert set(rec) == PARAM_KEYS
    names = ok("list", path, "-f", "names").splitlines()
    assert names == [p["name"] for p in doc["parameters"]]


def test_patterns_filter_every_format(samples_dir: Path) -> None:
    path = samples_dir / "transformer.pt"
    names = names_of(path, "blocks.*.attn", "!*.bias")
    assert names == [f"blocks.{i}.attn.{p}_proj.weight" for i in (0, 1) for p in "qkvo"]
    doc = list_json(path, "blocks.*.attn", "!*.bias")
    assert [p["name"] for p in doc["parameters"]] == names
    assert doc["totals"]["numel"] == 8 * 32 * 32
    assert names_of(path, "re:^blocks\\.1\\..*fc[12]\\.bias$") == [
        "blocks.1.mlp.fc1.bias", "blocks.1.mlp.fc2.bias"]
    assert names_of(path, "*.weight", "--exclude", "blocks") == [
        "embed.weight", "norm.weight", "lm_head.weight"]
    assert names_of(path, "nothing.here", "--allow-empty") == []


def test_filtered_totals_count_a_tied_name_alone(samples_dir: Path) -> None:
    # Listing only one name of a tied group still counts its tensor.
    doc = list_json(samples_dir / "transformer.pt", "lm_head")
    assert doc["totals"]["numel"] == 2048
    assert doc["parameters"][0]["tied"] == ["embed.weight"]


# -- tree --------------------------------------------------------------------------------------
def test_tree_depth_1_partial(sample: Sample) -> None:
    path = sample("transformer.pt")
    ok("freeze", path, "blocks.0")
    doc = json.loads(ok("list", path, "--tree", "--depth", "1", "-f", "json", real=True))
    assert set(doc) == {"source", "format", "modules"}
    for m in doc["modules"]:
        assert set(m) == TREE_KEYS
    rows = {m["module"]: (m["depth"], m["trainable"]) for m in doc["modules"]}
    assert rows == {"(all)": (0, "partial"), "embed": (1, "yes"), "blocks": (1, "partial"),
                    "norm": (1, "yes"), "lm_head": (1, "yes")}
    assert [m["module"] for m in doc["modules"]] == ["(all)", "embed", "blocks", "norm",
                                                     "lm_head"]
    state = torch.load(path, weights_only=True)
    numel = {m["module"]: m["numel"] for m in doc["modules"]}
    assert numel["blocks"] == sum(v.numel() for k, v in state.items()
                                  if k.startswith("blocks."))
    assert numel["(all)"] == sum({v.data_ptr(): v.numel() for v in state.values()}.values())
    nbytes = {m["module"]: m["bytes"] for m in doc["modules"]}
    assert nbytes["blocks"] == 4 * numel["blocks"]

    ok("freeze", path, "embed", "blocks.1")
    doc = json.loads(ok("list", path, "--tree", "--depth", "1", "-f", "json"))
    states = {m["module"]: m["trainable"] for m in doc["modules"]}
    assert states == {"(all)": "partial", "embed": "no", "blocks": "no", "norm": "yes",
                    "lm_head": "no"}


def test_tree_without_depth_goes_all_the_way(samples_dir: Path) -> None:
    doc = json.loads(ok("list", samples_dir / "mlp.pt", "--tree", "-f", "json"))
    assert [(m["module"], m["depth"]) for m in doc["modules"]] == [
        ("(all)", 0), ("layers", 1), ("layers.0", 2), ("layers.1", 2), ("head", 1)]
    assert all(m["trainable"] == "yes" for m in doc["modules"])


def test_tree_all_frozen_module_path(tmp_path: Path) -> None:
    ckpt = tmp_path / "frozen.pt"
    state = {k: nn.Parameter(v, requires_grad=False) for k, v in MLP().state_dict().items()}
    torch.save(state, ckpt)
    doc = json.loads(ok("list", MLP_FILE, "--weights", ckpt, "--tree", "--depth", "1",
                        "-f", "json"))
    assert {m["module"]: m["trainable"] for m in doc["modules"]} == {
        "(all)": "no", "layers": "no", "head": "no"}


# -- wrappers, --key, --strip-prefix -----------------------------------------------------------
def test_nested_checkpoint_auto_detected(samples_dir: Path) -> None:
    path = samples_dir / "transformer_nested.pt"
    auto = list_json(path)
    keyed = list_json(path, "--key", "model")
    assert auto["parameters"] == keyed["parameters"]
    assert auto["totals"] == keyed["totals"]
    expected = torch_file_records(path, key="model")
    assert auto["parameters"] == expected
    assert auto["totals"] == expected_totals(expected)
    # the optimizer state is not listed
    assert not any(p["name"].startswith(("state", "param_groups")) for p in auto["parameters"])


def test_key_picks_a_wrapper_explicitly(tmp_path: Path) -> None:
    path = tmp_path / "two.pt"
    torch.save({"model": MLP().state_dict(),
                "ema": {k: v.clone() for k, v in MLP(hidden=8).state_dict().items()}}, path)
    assert list_json(path, "--key", "ema")["parameters"] == torch_file_records(path, key="ema")
    assert list_json(path, "--key", "model")["parameters"] == torch_file_records(path, "model")


def test_strip_prefix(tmp_path: Path) -> None:
    state = TinyTransformer().state_dict()
    path = tmp_path / "ddp.pt"
    torch.save(OrderedDict((f"module.{k}", v) for k, v in state.items()), path)
    stored = names_of(path, real=True)
    assert stored == [f"module.{k}" for k in state]  # shown as stored by default
    doc = list_json(path, "--strip-prefix", "module.")
    assert [p["name"] for p in doc["parameters"]] == list(state)
    params = {p["name"]: p for p in doc["parameters"]}
    assert params["embed.weight"]["tied"] == ["lm_head.weight"]
    assert names_of(path, "--strip-prefix", "module.", "blocks.0.attn.q_proj") == [
        "blocks.0.attn.q_proj.weight", "blocks.0.attn.q_proj.bias"]
    inv = inspect(str(path), ["norm"], prefix="module.")
    assert [p.name for p in inv.params] == ["norm.weight", "norm.bias"]


def test_compile_prefix_shown_as_stored(tmp_path: Path) -> None:
    path = tmp_path / "compiled.pt"
    torch.save({f"_orig_mod.{k}": v for k, v in MLP().state_dict().items()}, path)
    assert names_of(path)[0] == "_orig_mod.layers.0.weight"
    assert names_of(path, "--strip-prefix", "_orig_mod.")[0] == "layers.0.weight"


# -- torch is not imported for file listings ---------------------------------------------------
NO_TORCH = textwrap.dedent("""
    import sys
    from paramctl.cli import main
    try:
        main(sys.argv[1:])
    except SystemExit as exc:
        assert exc.code in (0, None), exc.code
    assert "torch" not in sys.modules, "torch was imported"
    print("ok", file=sys.stderr)
""")


@pytest.mark.parametrize("args", [
    ["list", "{dir}/llama.pt", "-f", "json"],
    ["list", "{dir}/llama.safetensors", "-f", "json"],
    ["list", "{dir}/transformer_nested.pt", "-f", "json"],
    ["list", "{dir}/cnn.pt", "--tree", "-f", "tsv"],
    ["list", "{dir}/transformer.pt"],
    ["--help"],
    ["list", "--help"],
], ids=["pt", "safetensors", "nested", "tree", "tsv", "help", "list-help"])
def test_list_does_not_import_torch(samples_dir: Path, args: list[str]) -> None:
    argv = [a.format(dir=samples_dir) for a in args]
    res = subprocess.run([sys.executable, "-c", NO_TORCH, *argv], capture_output=True,
                         text=True, cwd=samples_dir,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip().endswith("ok")
    assert res.stdout
