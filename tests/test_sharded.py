"""Sharded safetensors (Hugging Face layout): listing from the index and shard headers,
index-only freeze/unfreeze, per-shard init, copies to a new folder, merges to one file,
and clear errors for broken layouts. Every fixture is written by safetensors itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import folder_state as snapshot
from helpers import list_json_in_fresh_python, one_error_line, run_cli
from helpers import run_inproc as run
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import paramctl

INDEX = "model.safetensors.index.json"
S1 = "model-00001-of-00003.safetensors"
S2 = "model-00002-of-00003.safetensors"
S3 = "model-00003-of-00003.safetensors"
SHARDS = (S1, S2, S3)
# which shard holds which state-dict entry (the index's weight_map)
LAYOUT = {
    "embed.weight": S1,
    "layers.0.weight": S1,
    "layers.0.bias": S1,
    "layers.1.weight": S2,  # bfloat16
    "layers.1.bias": S2,  # bfloat16
    "norm.weight": S2,
    "norm.bias": S2,
    "head.weight": S3,
    "head.bias": S3,
    "steps": S3,  # int64 buffer: never trainable
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)
        self.register_buffer("steps", torch.tensor([3], dtype=torch.int64))
        self.layers[1].to(torch.bfloat16)


def make_net(seed: int) -> Net:
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():  # non-trivial values everywhere (LayerNorm starts at ones/zeros)
        for p in net.parameters():
            p.copy_(torch.randn_like(p))
    return net


def write_sharded(folder: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Save ``Net`` as three shards with ``save_file`` plus an HF-style index."""
    state = {k: v.detach().clone().contiguous() for k, v in make_net(seed).state_dict().items()}
    assert set(state) == set(LAYOUT)
    folder.mkdir(parents=True, exist_ok=True)
    for shard in SHARDS:
        save_file({k: v for k, v in state.items() if LAYOUT[k] == shard}, str(folder / shard),
                  metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(LAYOUT.items()))}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return state


@pytest.fixture
def sharded(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = tmp_path / "ckpt"
    return folder, write_sharded(folder)


# -- helpers ---------------------------------------------------------------------------------
def raw(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def ident(t: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    return str(t.dtype), tuple(t.shape), raw(t)


def listing(target: Path, *extra: str) -> dict[str, Any]:
    res = run_cli("list", target, "-f", "json", *extra)
    assert res.returncode == 0, res.stderr
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def listed_frozen(target: Path) -> set[str]:
    return {p["name"] for p in listing(target)["parameters"]
            if not p["requires_grad"] and p["dtype"] != "int64"}


def union_of_shards(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / INDEX).read_text())
    out: dict[str, torch.Tensor] = {}
    for shard in dict.fromkeys(index["weight_map"].values()):
        tensors = load_file(str(folder / shard))
        assert not set(tensors) & set(out), f"{shard} repeats a tensor"
        out.update(tensors)
    assert set(out) == set(index["weight_map"])
    for name, shard in index["weight_map"].items():
        with safe_open(str(folder / shard), "pt") as f:
            held = f.keys()
        assert name in held, f"{name} mapped to {shard}, which lacks it"
    return out


FLOAT_NAMES = {n for n in LAYOUT if n != "steps"}


# -- list ------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["index", "folder"])
def test_list_agrees_with_shards(sharded: tuple[Path, dict[str, torch.Tensor]], how: str
                                 ) -> None:
    folder, state = sharded
    target = folder / INDEX if how == "index" else folder
    doc = listing(target)
    assert doc["format"] == "safetensors-sharded"
    params = {p["name"]: p for p in doc["parameters"]}
    truth = {}
    for shard in SHARDS:
        truth.update(load_file(str(folder / shard)))
    assert set(params) == set(truth) == set(LAYOUT)
    for name, t in truth.items():
        p = params[name]
        assert p["shape"] == list(t.shape), name
        assert p["dtype"] == str(t.dtype).removeprefix("torch."), name
        assert p["numel"] == t.numel(), name
        assert p["bytes"] == t.numel() * t.element_size(), name
        assert p["requires_grad"] is t.is_floating_point(), name
        assert torch.equal(t, state[name])
    assert params["layers.1.weight"]["dtype"] == "bfloat16"
    assert doc["totals"]["numel"] == sum(t.numel() for t in truth.values())
    assert doc["totals"]["trainable"] == sum(t.numel() for t in truth.values()
                                             if t.is_floating_point())
    # The plain table/tsv listing names every tensor once, too.
    res = run_cli("list", target, "-f", "names")
    assert res.returncode == 0, res.stderr
    assert sorted(res.stdout.split()) == sorted(LAYOUT)


@pytest.mark.parametrize("how", ["index", "folder"])
def test_list_does_not_import_torch(sharded: tuple[Path, dict[str, torch.Tensor]], how: str
                                    ) -> None:
    folder, _ = sharded
    target = folder / INDEX if how == "index" else folder
    res = list_json_in_fresh_python(target)
    assert "RESULT 0 []" in res.stderr, res.stderr
    assert {p["name"] for p in json.loads(res.stdout)["parameters"]} == set(LAYOUT)


# -- freeze / unfreeze -----------------------------------------------------------------------
def test_freeze_unfreeze_touch_only_the_index(
        sharded: tuple[Path, dict[str, torch.Tensor]]) -> None:
    folder, state = sharded
    before = snapshot(folder)
    index_before = json.loads((folder / INDEX).read_text())

    res = run_cli("freeze", folder, "layers.*", "norm")
    assert res.returncode == 0, res.stderr
    after = snapshot(folder)
    assert set(after) == set(before)  # no temp files, no new files
    for shard in SHARDS:
        assert after[shard] == before[shard], f"{shard} was rewritten by freeze"
    index = json.loads((folder / INDEX).read_text())
    assert index["weight_map"] == index_before["weight_map"]
    assert index["metadata"]["total_size"] == index_before["metadata"]["total_size"]
    want = {"layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias",
            "norm.weight", "norm.bias"}
    frozen = index["metadata"]["paramctl.frozen"]
    if isinstance(frozen, str):  # tolerate the JSON-in-a-string form safetensors uses
        frozen = json.loads(frozen)
    assert set(frozen) == want
    assert listed_frozen(folder) == want
    assert listed_frozen(folder / INDEX) == want
    res = run_cli("list", folder, "--trainable", "-f", "names")
    assert set(res.stdout.split()) == {"embed.weight", "head.weight", "head.bias"}

    res = run_cli("unfreeze", folder / INDEX, "layers.1", "norm.bias")
    assert res.returncode == 0, res.stderr
    again = snapshot(folder)
    assert set(again) == set(before)
    for shard in SHARDS:
        assert again[shard] == before[shard], f"{shard} was rewritten by unfreeze"
    assert listed_frozen(folder) == {"layers.0.weight", "layers.0.bias", "norm.weight"}
    assert {k: ident(v) for k, v in union_of_shards(folder).items()} == \
        {k: ident(v) for k, v in state.items()}

    res = run_cli("unfreeze", folder, "*")
    assert res.returncode == 0, res.stderr
    assert listed_frozen(folder) == set()
    assert all(snapshot(folder)[s] == before[s] for s in SHARDS)


def test_freeze_dry_run_writes_nothing(sharded: tuple[Path, dict[str, torch.Tensor]]) -> None:
    folder, _ = sharded
    before = snapshot(folder)
    res = run_cli("freeze", folder, "embed", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "embed.weight" in res.stdout
    assert snapshot(folder) == before


# -- Python API ------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["index", "folder"])
def test_load_state_dict_from_sharded(sharded: tuple[Path, dict[str, torch.Tensor]],
                                      how: str) -> None:
    folder, state = sharded
    res = run_cli("freeze", folder, "embed", "layers.0")
    assert res.returncode == 0, res.stderr
    model = make_net(seed=123)  # different weights
    assert not torch.equal(model.embed.weight, state["embed.weight"])
    target = folder / INDEX if how == "index" else folder
    result = paramctl.load_state_dict(model, target)
    assert list(result.missing_keys) == [] and list(result.unexpected_keys) == []
    for name, t in model.state_dict().items():
        assert ident(t) == ident(state[name]), name
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert {n for n, rg in flags.items() if not rg} == \
        {"embed.weight", "layers.0.weight", "layers.0.bias"}
    assert set(paramctl.frozen_names(target)) == {"embed.weight", "layers.0.weight",
                                                  "layers.0.bias"}


# -- init ------------------------------------------------------------------------------------
def test_init_rewrites_only_shards_holding_selected(
        sharded: tuple[Path, dict[str, torch.Tensor]], capsys: pytest.CaptureFixture[str]
) -> None:
    folder, state = sharded
    run_cli("freeze", folder, "norm")
    before = snapshot(folder)
    res = run(capsys, "init", folder, "head.bias=zeros", "layers.1.weight=ones", "--seed", "0")
    assert res.returncode == 0, res.stderr
    after = snapshot(folder)
    assert set(after) == set(before), "temp or stray files left in the folder"
    assert after[S1] == before[S1], "a shard without selected tensors was rewritten"
    assert after[S2][0] != before[S2][0] and after[S3][0] != before[S3][0]
    for shard in (S2, S3):
        assert after[shard][2] == before[shard][2], f"{shard}: file mode changed"
        with safe_open(str(folder / shard), "pt") as f:
            assert f.metadata() == {"format": "pt"}, "shard __metadata__ not preserved"
    now = union_of_shards(folder)
    assert now["head.bias"].dtype == torch.float32
    assert torch.equal(now["head.bias"], torch.zeros(4))
    assert now["layers.1.weight"].dtype == torch.bfloat16
    assert torch.equal(now["layers.1.weight"], torch.ones(8, 8, dtype=torch.bfloat16))
    for name, t in state.items():
        if name not in ("head.bias", "layers.1.weight"):
            assert ident(now[name]) == ident(t), f"{name} changed"
    index = json.loads((folder / INDEX).read_text())
    assert index["weight_map"] == dict(sorted(LAYOUT.items()))
    assert listed_frozen(folder) == {"norm.weight", "norm.bias"}


def test_init_seed_is_per_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Same seed: a tensor's value depends on its name only, not on what else is selected."""
    a, b = tmp_path / "a", tmp_path / "b"
    write_sharded(a)
    write_sharded(b)
    res = run(capsys, "init", a, "head.weight=normal(std=0.5)", "--seed", "7")
    assert res.returncode == 0, res.stderr
    res = run(capsys, "init", b / INDEX, "embed.weight=normal(std=0.5)",
              "head.weight=normal(std=0.5)", "--seed", "7")
    assert res.returncode == 0, res.stderr
    ta, tb = union_of_shards(a), union_of_shards(b)
    assert ident(ta["head.weight"]) == ident(tb["head.weight"])
    assert not torch.equal(ta["embed.weight"], tb["embed.weight"])
    assert snapshot(a)[S2][0] == snapshot(b)[S2][0]  # untouched in both


def test_init_to_new_folder_leaves_source_untouched(
        sharded: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    folder, state = sharded
    run_cli("freeze", folder, "layers.0")
    before = snapshot(folder)
    out = tmp_path / "reset"
    res = run(capsys, "init", folder, "embed=zeros", "-o", out)
    assert res.returncode == 0, res.stderr
    assert snapshot(folder) == before, "the source changed"
    assert sorted(p.name for p in out.iterdir()) == sorted([*SHARDS, INDEX])
    now = union_of_shards(out)
    assert torch.equal(now["embed.weight"], torch.zeros(16, 8))
    for name, t in state.items():
        if name != "embed.weight":
            assert ident(now[name]) == ident(t), name
    # untouched shards are byte-for-byte copies
    assert (out / S2).read_bytes() == (folder / S2).read_bytes()
    assert (out / S3).read_bytes() == (folder / S3).read_bytes()
    assert listed_frozen(out) == {"layers.0.weight", "layers.0.bias"}
    assert {p["name"] for p in listing(out / INDEX)["parameters"]} == set(LAYOUT)
    model = make_net(seed=5)
    paramctl.load_state_dict(model, out)
    assert torch.equal(model.embed.weight, torch.zeros(16, 8))
    assert not model.layers[0].weight.requires_grad


def test_freeze_to_new_folder(sharded: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
                              ) -> None:
    folder, state = sharded
    before = snapshot(folder)
    out = tmp_path / "copy"
    res = run_cli("freeze", folder, "head", "-o", out)
    assert res.returncode == 0, res.stderr
    assert snapshot(folder) == before
    assert listed_frozen(folder) == set()
    assert listed_frozen(out) == {"head.weight", "head.bias"}
    for shard in SHARDS:
        assert (out / shard).read_bytes() == (folder / shard).read_bytes()
    assert {k: ident(v) for k, v in union_of_shards(out).items()} == \
        {k: ident(v) for k, v in state.items()}


# -- merge -----------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".safetensors", ".pt"])
def test_merge_equals_union_of_shards(sharded: tuple[Path, dict[str, torch.Tensor]],
                                      tmp_path: Path, ext: str) -> None:
    folder, state = sharded
    run_cli("freeze", folder, "layers.0")
    before = snapshot(folder)
    out = tmp_path / f"one{ext}"
    res = run_cli("freeze", folder / INDEX, "head", "-o", out)
    assert res.returncode == 0, res.stderr
    assert snapshot(folder) == before
    frozen = {"layers.0.weight", "layers.0.bias", "head.weight", "head.bias"}
    if ext == ".safetensors":
        merged = load_file(str(out))
        with safe_open(str(out), "pt") as f:
            meta = f.metadata()
        assert set(json.loads(meta["paramctl.frozen"])) == frozen
    else:
        merged = torch.load(out, map_location="cpu", weights_only=True)
        flagged = {n for n, t in merged.items() if isinstance(t, nn.Parameter)}
        assert flagged == frozen
        assert all(not merged[n].requires_grad for n in frozen)
    assert set(merged) == set(state)
    for name, t in union_of_shards(folder).items():
        assert ident(merged[name]) == ident(t), name
    assert listed_frozen(out) == frozen
    # strict load into the real module works
    model = make_net(seed=9)
    model.load_state_dict(merged)


@pytest.mark.parametrize("ext", [".safetensors", ".pt"])
def test_merge_with_init(sharded: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path,
                         ext: str, capsys: pytest.CaptureFixture[str]) -> None:
    folder, state = sharded
    before = snapshot(folder)
    out = tmp_path / f"one{ext}"
    res = run(capsys, "init", folder, "layers.1.bias=ones", "-o", out)
    assert res.returncode == 0, res.stderr
    assert snapshot(folder) == before
    merged = load_file(str(out)) if ext == ".safetensors" else \
        torch.load(out, map_location="cpu", weights_only=True)
    assert ident(merged["layers.1.bias"]) == ident(torch.ones(8, dtype=torch.bfloat16))
    for name, t in state.items():
        if name != "layers.1.bias":
            assert ident(merged[name]) == ident(t), name


# -- errors ----------------------------------------------------------------------------------
def _drop_shard(folder: Path) -> str:
    (folder / S2).unlink()
    return S2


def _ghost_in_index(folder: Path) -> str:
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"]["ghost.weight"] = S1
    (folder / INDEX).write_text(json.dumps(index))
    return "ghost.weight"


def _unindexed_tensor(folder: Path) -> str:
    tensors = load_file(str(folder / S3))
    tensors["stray.weight"] = torch.ones(2)
    save_file(tensors, str(folder / S3), metadata={"format": "pt"})
    return "stray.weight"


def _malformed_json(folder: Path) -> str:
    (folder / INDEX).write_text('{"metadata": {}, "weight_map": {"a": ')
    return INDEX


def _weight_map_not_object(folder: Path) -> str:
    (folder / INDEX).write_text('{"metadata": {}, "weight_map": ["a", "b"]}')
    return "weight_map"


BROKEN = {
    "missing-shard": _drop_shard,
    "index-names-absent-tensor": _ghost_in_index,
    "shard-holds-unindexed-tensor": _unindexed_tensor,
    "malformed-json": _malformed_json,
    "weight-map-not-object": _weight_map_not_object,
}


@pytest.mark.parametrize("case", list(BROKEN))
@pytest.mark.parametrize("command", ["list", "freeze"])
def test_broken_layout_is_one_line_error(sharded: tuple[Path, dict[str, torch.Tensor]],
                                         case: str, command: str) -> None:
    folder, _ = sharded
    needle = BROKEN[case](folder)
    before = snapshot(folder)
    for target in (folder, folder / INDEX):
        args = ["list", target] if command == "list" else ["freeze", target, "embed"]
        res = run_cli(*args)
        assert res.returncode == 1, (case, res.returncode, res.stderr)
        line = one_error_line(res)
        assert needle in line, line
        assert res.stdout == ""
        assert snapshot(folder) == before, "a failed command changed the folder"


def test_missing_shard_error_names_it(sharded: tuple[Path, dict[str, torch.Tensor]]) -> None:
    folder, _ = sharded
    (folder / S3).unlink()
    res = run_cli("list", folder / INDEX)
    assert res.returncode == 1
    line = one_error_line(res)
    assert S3 in line and "missing" in line


def test_shard_path_escaping_the_folder_is_refused(
        sharded: tuple[Path, dict[str, torch.Tensor]]) -> None:
    folder, _ = sharded
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"]["embed.weight"] = "../" + S1
    (folder / INDEX).write_text(json.dumps(index))
    res = run_cli("list", folder)
    assert res.returncode == 1
    one_error_line(res)


def test_folder_with_two_indexes_asks_for_one(
        sharded: tuple[Path, dict[str, torch.Tensor]]) -> None:
    folder, _ = sharded
    (folder / "other.safetensors.index.json").write_bytes((folder / INDEX).read_bytes())
    res = run_cli("list", folder)
    assert res.returncode == 1
    line = one_error_line(res)
    assert INDEX in line and "other.safetensors.index.json" in line
    assert run_cli("list", folder / INDEX).returncode == 0



def test_output_folder_holding_another_checkpoint_is_refused(
        sharded: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    """``-o`` names a *new* folder (DESIGN, Writing back; the DCP source refuses a non-empty
    one with exit 2). Writing into a folder that already holds another sharded checkpoint
    overwrites its index and strands its shards."""
    folder, _ = sharded
    other = tmp_path / "other"
    write_sharded(other, seed=1)
    (other / S3).rename(other / "model-00003-of-00004.safetensors")
    index = json.loads((other / INDEX).read_text())
    index["weight_map"] = {k: ("model-00003-of-00004.safetensors" if v == S3 else v)
                           for k, v in index["weight_map"].items()}
    (other / INDEX).write_text(json.dumps(index))
    before = snapshot(other)
    res = run_cli("freeze", folder, "embed", "-o", other)
    assert res.returncode == 2, (res.returncode, res.stderr)
    one_error_line(res)
    assert snapshot(other) == before
