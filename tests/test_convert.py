"""Conversions: .pt <-> .safetensors (bit-exact, frozen flags kept), nested checkpoints that
need --key, and single file -> sharded safetensors with --max-shard-size."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import one_error_line, run_cli, sha
from helpers import run_inproc as run
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import paramctl
from sample_models.cnn import SmallCNN
from sample_models.llama import Llama

Sample = Callable[[str], Path]


# -- helpers ---------------------------------------------------------------------------------
def ident(t: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return str(t.dtype), tuple(t.shape), raw


def idents(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    return {k: ident(v) for k, v in tensors.items()}


def load_pt(path: Path) -> dict[str, torch.Tensor]:
    loaded: dict[str, torch.Tensor] = torch.load(path, map_location="cpu", weights_only=True)
    return loaded


def st_frozen(path: Path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return set(json.loads(meta.get("paramctl.frozen", "[]")))


def pt_frozen(tensors: dict[str, torch.Tensor]) -> set[str]:
    """Names stored as nn.Parameter(requires_grad=False), the torch-file frozen marker."""
    return {n for n, t in tensors.items() if isinstance(t, nn.Parameter) and not t.requires_grad}


def listing(target: Path) -> dict[str, dict[str, Any]]:
    res = run_cli("list", target, "-f", "json")
    assert res.returncode == 0, res.stderr
    return {p["name"]: p for p in json.loads(res.stdout)["parameters"]}


def mixed_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A torch.save'd state dict: every common dtype, a 0-d tensor, views with strides and
    offsets, and one tensor saved frozen as nn.Parameter(requires_grad=False)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    sd: dict[str, torch.Tensor] = {
        "enc.weight": nn.Parameter(torch.randn(8, 4, generator=g), requires_grad=False),
        "enc.bias": torch.randn(8, generator=g),
        "half": torch.randn(3, 3, generator=g).half(),
        "bf16": torch.randn(5, generator=g).bfloat16(),
        "f64": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "idx": torch.arange(7, dtype=torch.int32),
        "mask": torch.tensor([True, False, True]),
        "count": torch.tensor(5),
        "transposed": base.t(),
        "sliced": base[2:4],
        "nan_inf": torch.tensor([float("nan"), float("inf"), -0.0, 1e-45]),
    }
    torch.save(sd, path)
    return sd


ORIGINALLY_FROZEN = {"enc.weight"}
FROZEN_AFTER = {"enc.weight", "half"}  # the conversion below also freezes "half"


# -- .pt <-> .safetensors --------------------------------------------------------------------
@pytest.fixture
def round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]
               ) -> tuple[dict[str, torch.Tensor], Path, Path]:
    src = tmp_path / "mixed.pt"
    sd = mixed_checkpoint(src)
    before = sha(src)
    mid = tmp_path / "mixed.safetensors"
    res = run(capsys, "freeze", src, "half", "-o", mid)
    assert res.returncode == 0, res.stderr
    back = tmp_path / "back.pt"
    res = run(capsys, "freeze", mid, "half", "-o", back)  # already frozen: a plain conversion
    assert res.returncode == 0, res.stderr
    assert sha(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back.pt", "mixed.pt",
                                                          "mixed.safetensors"]
    return sd, mid, back


def test_round_trip_is_bit_identical(round_trip: tuple[dict[str, torch.Tensor], Path, Path]
                                     ) -> None:
    sd, mid, back = round_trip
    want = idents(sd)
    assert idents(load_file(str(mid))) == want
    got = load_pt(back)
    assert list(got) == list(sd)
    assert idents(got) == want


def test_round_trip_keeps_frozen_flags(round_trip: tuple[dict[str, torch.Tensor], Path, Path]
                                       ) -> None:
    _, mid, back = round_trip
    assert st_frozen(mid) == FROZEN_AFTER
    got = load_pt(back)
    assert pt_frozen(got) == FROZEN_AFTER
    # Only frozen tensors become Parameters; everything else stays a plain tensor.
    assert {n for n, t in got.items() if isinstance(t, nn.Parameter)} == FROZEN_AFTER
    for path in (mid, back):
        params = listing(path)
        assert {n for n, p in params.items() if not p["requires_grad"]} == \
            FROZEN_AFTER | {"idx", "mask", "count"}


def test_round_trip_of_a_model_with_buffers(samples_dir: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """cnn.pt (BatchNorm with int64 num_batches_tracked): buffers stay buffers after a
    .pt -> .safetensors -> .pt round trip, even when loaded with assign=True."""
    mid, back = tmp_path / "cnn.safetensors", tmp_path / "cnn.pt"
    assert run(capsys, "freeze", samples_dir / "cnn.pt", "classifier", "-o", mid).returncode == 0
    assert run(capsys, "freeze", mid, "classifier", "-o", back).returncode == 0
    original = load_pt(samples_dir / "cnn.pt")
    got = load_pt(back)
    assert idents(got) == idents(original)
    assert st_frozen(mid) == {"classifier.weight", "classifier.bias"}
    assert pt_frozen(got) == {"classifier.weight", "classifier.bias"}
    model = SmallCNN()
    model.load_state_dict(got, assign=True)
    assert "features.1.num_batches_tracked" in dict(model.named_buffers())
    assert "features.1.num_batches_tracked" not in dict(model.named_parameters())
    model = SmallCNN()
    paramctl.load_state_dict(model, back)
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == \
        {"classifier.weight", "classifier.bias"}


def test_safetensors_to_pt_loads_strictly(samples_dir: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "llama.pt"
    res = run(capsys, "freeze", samples_dir / "llama.safetensors", "model.layers.0", "-o", out)
    assert res.returncode == 0, res.stderr
    got = load_pt(out)
    assert idents(got) == idents(load_file(str(samples_dir / "llama.safetensors")))
    model = Llama()
    model.load_state_dict(got)  # strict
    model = Llama()
    paramctl.load_state_dict(model, out)
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == \
        {n for n in got if n.startswith("model.layers.0.")}


# -- nested checkpoints ----------------------------------------------------------------------
def test_nested_to_safetensors_needs_key(sample: Sample, tmp_path: Path) -> None:
    src = sample("transformer_nested.pt")
    before = sha(src)
    out = tmp_path / "nested.safetensors"
    res = run_cli("freeze", src, "embed", "-o", out)
    assert res.returncode == 2, res.stderr
    line = one_error_line(res)
    assert "--key model" in line, line
    assert not out.exists()
    assert sha(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["transformer_nested.pt"]

    res = run_cli("freeze", src, "norm", "--key", "model", "-o", out)
    assert res.returncode == 0, res.stderr
    assert sha(src) == before
    got = load_file(str(out))
    model_sd = torch.load(src, map_location="cpu", weights_only=True)["model"]
    assert set(got) == set(model_sd)
    for name, t in model_sd.items():
        assert ident(got[name]) == ident(t), name
    assert st_frozen(out) == {n for n in model_sd if n.startswith("norm.")}


# -- single file -> sharded ------------------------------------------------------------------
@pytest.mark.parametrize("src_name", ["llama.safetensors", "llama.pt"])
def test_single_file_to_sharded(sample: Sample, tmp_path: Path, src_name: str,
                                capsys: pytest.CaptureFixture[str]) -> None:
    src = sample(src_name)
    assert run(capsys, "freeze", src, "model.norm").returncode == 0  # frozen state to carry
    before = sha(src)
    out = tmp_path / "sharded"
    res = run(capsys, "freeze", src, "model.layers.0", "-o", out, "--max-shard-size", "50KB")
    assert res.returncode == 0, res.stderr
    assert sha(src) == before

    original = load_file(str(src)) if src.suffix == ".safetensors" else load_pt(src)
    shards = sorted(out.glob("*.safetensors"))
    indexes = sorted(out.glob("*.safetensors.index.json"))
    assert len(indexes) == 1 and len(shards) > 1
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in [*shards, *indexes])
    index = json.loads(indexes[0].read_text())
    weight_map: dict[str, str] = index["weight_map"]
    assert set(weight_map) == set(original)
    assert set(weight_map.values()) == {p.name for p in shards}
    union: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors = load_file(str(shard))
        assert {n for n, s in weight_map.items() if s == shard.name} == set(tensors)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        assert nbytes <= 50_000 or len(tensors) == 1, (shard.name, nbytes)
        assert not set(tensors) & set(union)
        union.update(tensors)
    assert idents(union) == idents({k: v.detach() for k, v in original.items()})
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in union.values())

    frozen = {n for n in original if n.startswith(("model.layers.0.", "model.norm."))}
    for target in (out, indexes[0]):
        params = listing(target)
        assert list(params) == list(weight_map)
        assert {n for n, p in params.items() if not p["requires_grad"]} == frozen
    model = Llama()
    paramctl.load_state_dict(model, out)
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen
    assert idents(model.state_dict()) == idents({k: v.detach() for k, v in original.items()})


@pytest.mark.parametrize("extra", [[], ["--max-shard-size", "lots"]])
def test_folder_output_needs_a_shard_size(sample: Sample, tmp_path: Path,
                                          extra: list[str]) -> None:
    src = sample("mlp.safetensors")
    before = sha(src)
    out = tmp_path / "sharded"
    res = run_cli("freeze", src, "head", "-o", out, *extra)
    assert res.returncode == 2, res.stderr
    assert "--max-shard-size" in one_error_line(res)
    assert not out.exists()
    assert sha(src) == before
