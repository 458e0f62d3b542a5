"""torch.distributed.checkpoint folders: listing from ``.metadata`` alone (no torch, no code
from the file), the ``.paramctl.json`` sidecar, init through DCP itself (in place, to a new
folder, and under torchrun), conversion to single files, and unsafe metadata. Every
fixture is written by ``torch.distributed.checkpoint.save`` and checked with its ``load``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import helpers
import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import REPO, list_json_in_fresh_python, run_cli
from helpers import folder_state as snapshot
from helpers import run_inproc as run
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn


def one_error_line(res: subprocess.CompletedProcess[str]) -> str:
    """DCP runs may print an --unsafe-load warning before the error line."""
    return helpers.one_error_line(res, ignore_warnings=True)


# Flattened tensor names, in the order DCP records them, with dtype and shape.
TENSORS: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
    "model.enc.weight": (torch.float32, (6, 4)),
    "model.enc.bias": (torch.bfloat16, (6,)),
    "model.blocks.0": (torch.float16, (3, 3)),
    "model.blocks.1": (torch.float32, (3,)),
    "model.scale": (torch.float32, ()),
    "model.head.weight": (torch.float64, (2, 6)),
    "counter": (torch.int64, (4,)),
}
NON_TENSORS = {"step": 7, "name": "run-1", "cfg": {"lr": 0.001, "betas": (0.9, 0.95)}}


def state_dict(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype)

    return {
        "model": {
            "enc": {"weight": r(6, 4), "bias": r(6, dtype=torch.bfloat16)},
            "blocks": [r(3, 3, dtype=torch.float16), r(3)],
            "scale": torch.tensor(2.5),
            "head": {"weight": r(2, 6, dtype=torch.float64)},
        },
        "counter": torch.arange(4) * 3,
        "step": 7,
        "name": "run-1",
        "cfg": {"lr": 0.001, "betas": (0.9, 0.95)},
    }


def template() -> dict[str, Any]:
    """Same structure, wrong values: what ``dcp.load`` fills in."""
    return {
        "model": {
            "enc": {"weight": torch.full((6, 4), 99.0),
                    "bias": torch.full((6,), 99.0, dtype=torch.bfloat16)},
            "blocks": [torch.full((3, 3), 99.0, dtype=torch.float16), torch.full((3,), 99.0)],
            "scale": torch.tensor(99.0),
            "head": {"weight": torch.full((2, 6), 99.0, dtype=torch.float64)},
        },
        "counter": torch.full((4,), 99, dtype=torch.int64),
        "step": 0,
        "name": "",
        "cfg": {"lr": 0.0, "betas": (0.0, 0.0)},
    }


def flat(sd: dict[str, Any]) -> dict[str, torch.Tensor]:
    m = sd["model"]
    return {
        "model.enc.weight": m["enc"]["weight"], "model.enc.bias": m["enc"]["bias"],
        "model.blocks.0": m["blocks"][0], "model.blocks.1": m["blocks"][1],
        "model.scale": m["scale"], "model.head.weight": m["head"]["weight"],
        "counter": sd["counter"],
    }


def non_tensors(sd: dict[str, Any]) -> dict[str, Any]:
    return {k: sd[k] for k in NON_TENSORS}


def save_dcp(folder: Path, seed: int = 0) -> dict[str, Any]:
    sd = state_dict(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, checkpoint_id=str(folder), no_dist=True)
    return sd


def load_dcp(folder: Path) -> dict[str, Any]:
    sd = template()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(sd, checkpoint_id=str(folder), no_dist=True)
    return sd


@pytest.fixture
def ckpt(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    folder = tmp_path / "step_7"
    return folder, save_dcp(folder)


# -- helpers ---------------------------------------------------------------------------------
def ident(t: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return str(t.dtype), tuple(t.shape), raw


def idents(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    return {k: ident(v) for k, v in tensors.items()}


def listing(target: Path) -> dict[str, Any]:
    res = run_cli("list", target, "-f", "json")
    assert res.returncode == 0, res.stderr
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def listed_frozen(target: Path) -> set[str]:
    return {p["name"] for p in listing(target)["parameters"]
            if not p["requires_grad"] and p["dtype"] != "int64"}


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


# -- list ------------------------------------------------------------------------------------
def test_list_agrees_with_saved_state_dict(ckpt: tuple[Path, dict[str, Any]]) -> None:
    folder, sd = ckpt
    doc = listing(folder)
    assert doc["format"] == "dcp"
    params = doc["parameters"]
    assert [p["name"] for p in params] == list(TENSORS)  # no step / name / cfg.*
    truth = flat(sd)
    for p in params:
        dtype, shape = TENSORS[p["name"]]
        t = truth[p["name"]]
        assert (t.dtype, tuple(t.shape)) == (dtype, shape)
        assert p["dtype"] == dtype_name(dtype)
        assert p["shape"] == list(shape)
        assert p["numel"] == t.numel()
        assert p["bytes"] == t.numel() * t.element_size()
        assert p["requires_grad"] is t.is_floating_point()
    # the same names DCP's own metadata reader reports as tensors
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    assert {k for k, v in meta.items() if isinstance(v, TensorStorageMetadata)} == set(TENSORS)
    assert {k for k, v in meta.items() if not isinstance(v, TensorStorageMetadata)} == \
        {"step", "name", "cfg.lr", "cfg.betas"}
    res = run_cli("list", folder, "-f", "names")
    assert res.stdout.split() == list(TENSORS)


def test_list_does_not_import_torch(ckpt: tuple[Path, dict[str, Any]]) -> None:
    folder, _ = ckpt
    res = list_json_in_fresh_python(folder)
    assert "RESULT 0 []" in res.stderr, res.stderr
    assert [p["name"] for p in json.loads(res.stdout)["parameters"]] == list(TENSORS)


# -- freeze ----------------------------------------------------------------------------------
def test_freeze_writes_sidecar_only(ckpt: tuple[Path, dict[str, Any]]) -> None:
    folder, sd = ckpt
    before = snapshot(folder)
    res = run_cli("freeze", folder, "model.enc", "model.blocks.1")
    assert res.returncode == 0, res.stderr
    after = snapshot(folder)
    assert set(after) == {*before, ".paramctl.json"}
    for name, state in before.items():
        assert after[name] == state, f"{name} changed"
    want = {"model.enc.weight", "model.enc.bias", "model.blocks.1"}
    doc = json.loads((folder / ".paramctl.json").read_text())
    assert set(doc["frozen"]) == want
    assert listed_frozen(folder) == want
    res = run_cli("list", folder, "--frozen", "-f", "names")
    assert set(res.stdout.split()) - {"counter"} == want  # (an int tensor is never trainable)
    # DCP still loads the folder, with every value intact
    loaded = load_dcp(folder)
    assert idents(flat(loaded)) == idents(flat(sd))
    assert non_tensors(loaded) == NON_TENSORS

    res = run_cli("unfreeze", folder, "model.enc.bias")
    assert res.returncode == 0, res.stderr
    assert listed_frozen(folder) == {"model.enc.weight", "model.blocks.1"}
    assert all(snapshot(folder)[n] == before[n] for n in before)


def test_freeze_to_new_folder(ckpt: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    folder, sd = ckpt
    before = snapshot(folder)
    out = tmp_path / "frozen_copy"
    res = run_cli("freeze", folder, "model.head", "-o", out)
    assert res.returncode == 0, res.stderr
    assert snapshot(folder) == before
    assert listed_frozen(out) == {"model.head.weight"}
    loaded = load_dcp(out)
    assert idents(flat(loaded)) == idents(flat(sd))
    assert non_tensors(loaded) == NON_TENSORS


# -- init ------------------------------------------------------------------------------------
def test_init_in_place(ckpt: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str]
                       ) -> None:
    folder, sd = ckpt
    parent_before = sorted(p.name for p in folder.parent.iterdir())
    assert run_cli("freeze", folder, "model.head").returncode == 0
    res = run(capsys, "init", folder, "model.blocks.0=ones", "model.enc.bias=zeros",
              "model.scale=constant(val=0.5)", "--seed", "0")
    assert res.returncode == 0, res.stderr
    loaded = load_dcp(folder)
    now = flat(loaded)
    assert ident(now["model.blocks.0"]) == ident(torch.ones(3, 3, dtype=torch.float16))
    assert ident(now["model.enc.bias"]) == ident(torch.zeros(6, dtype=torch.bfloat16))
    assert ident(now["model.scale"]) == ident(torch.tensor(0.5))
    for name, t in flat(sd).items():
        if name not in ("model.blocks.0", "model.enc.bias", "model.scale"):
            assert ident(now[name]) == ident(t), f"{name} changed"
    # non-tensor entries come back exactly, with their types
    assert non_tensors(loaded) == NON_TENSORS
    assert type(loaded["step"]) is int and type(loaded["cfg"]["betas"]) is tuple
    # no temporary folders or files next to the checkpoint
    assert sorted(p.name for p in folder.parent.iterdir()) == parent_before
    assert not [p for p in folder.iterdir() if "paramctl-" in p.name or p.suffix == ".tmp"]
    # frozen state survives the rewrite; the listing reads the new metadata
    assert listed_frozen(folder) == {"model.head.weight"}
    assert {p["name"] for p in listing(folder)["parameters"]} == set(TENSORS)


def test_init_in_place_keeps_folder_permissions(
        ckpt: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    """Writing back preserves file modes; a DCP checkpoint is a folder, so its mode too
    (a shared checkpoint must not silently become private to its owner)."""
    folder, _ = ckpt
    folder.chmod(0o755)
    res = run(capsys, "init", folder, "model.scale=zeros")
    assert res.returncode == 0, res.stderr
    assert oct(folder.stat().st_mode & 0o777) == oct(0o755)


def test_init_in_place_keeps_other_files_in_the_folder(
        ckpt: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    """DCP ignores files it does not reference (which is why the sidecar works); a rewrite
    must not delete a user's files that live in the checkpoint folder."""
    folder, _ = ckpt
    (folder / "train_config.json").write_text('{"lr": 0.001}\n')
    res = run(capsys, "init", folder, "model.scale=zeros")
    assert res.returncode == 0, res.stderr
    assert (folder / "train_config.json").is_file(), \
        f"train_config.json deleted; folder now holds {sorted(p.name for p in folder.iterdir())}"
    assert (folder / "train_config.json").read_text() == '{"lr": 0.001}\n'


def test_init_to_new_folder(ckpt: tuple[Path, dict[str, Any]], tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    folder, sd = ckpt
    assert run_cli("freeze", folder, "model.enc.weight").returncode == 0
    before = snapshot(folder)
    out = tmp_path / "reinit"
    res = run(capsys, "init", folder, "model.head.weight=ones", "-o", out)
    assert res.returncode == 0, res.stderr
    assert snapshot(folder) == before, "the source changed"
    loaded = load_dcp(out)
    now = flat(loaded)
    assert ident(now["model.head.weight"]) == ident(torch.ones(2, 6, dtype=torch.float64))
    for name, t in flat(sd).items():
        if name != "model.head.weight":
            assert ident(now[name]) == ident(t), name
    assert non_tensors(loaded) == NON_TENSORS
    assert listed_frozen(out) == {"model.enc.weight"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reinit", "step_7"]
    # the source still loads as before
    assert idents(flat(load_dcp(folder))) == idents(flat(sd))


def test_init_refuses_nonempty_output_folder(ckpt: tuple[Path, dict[str, Any]],
                                             tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = ckpt
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = run(capsys, "init", folder, "model.scale=zeros", "-o", out)
    assert res.returncode == 2, res.stderr
    one_error_line(res)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


# -- convert to single files -----------------------------------------------------------------
@pytest.mark.parametrize("ext", [".pt", ".safetensors"])
def test_convert_to_single_file(ckpt: tuple[Path, dict[str, Any]], tmp_path: Path, ext: str,
                                capsys: pytest.CaptureFixture[str]) -> None:
    folder, sd = ckpt
    assert idents(flat(load_dcp(folder))) == idents(flat(sd))
    assert run_cli("freeze", folder, "model.enc").returncode == 0
    before = snapshot(folder)
    out = tmp_path / f"converted{ext}"
    res = run(capsys, "freeze", folder, "model.head", "-o", out)
    assert res.returncode == 0, res.stderr
    assert snapshot(folder) == before
    frozen = {"model.enc.weight", "model.enc.bias", "model.head.weight"}
    if ext == ".pt":
        got = torch.load(out, map_location="cpu", weights_only=True)
        assert {n for n, t in got.items() if isinstance(t, nn.Parameter)} == frozen
        assert not any(got[n].requires_grad for n in frozen)
    else:
        got = load_file(str(out))
        with safe_open(str(out), "pt") as f:
            assert set(json.loads(f.metadata()["paramctl.frozen"])) == frozen
    assert list(got) == list(TENSORS)
    assert idents({k: v.detach() for k, v in got.items()}) == idents(flat(load_dcp(folder)))
    assert listed_frozen(out) == frozen


def test_convert_with_init(ckpt: tuple[Path, dict[str, Any]], tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    folder, sd = ckpt
    out = tmp_path / "reset.safetensors"
    res = run(capsys, "init", folder, "model.enc.bias=ones", "-o", out)
    assert res.returncode == 0, res.stderr
    got = load_file(str(out))
    assert ident(got["model.enc.bias"]) == ident(torch.ones(6, dtype=torch.bfloat16))
    for name, t in flat(sd).items():
        if name != "model.enc.bias":
            assert ident(got[name]) == ident(t), name


# -- unsafe metadata -------------------------------------------------------------------------
def evil_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A DCP folder whose .metadata is a pickle calling os.system (written by hand)."""
    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "PWNED"
    cmd = f"touch {marker}".encode()
    payload = (b"\x80\x02" + b"cos\nsystem\n" + b"X" + len(cmd).to_bytes(4, "little") + cmd
               + b"\x85R.")
    (folder / ".metadata").write_bytes(payload)
    (folder / "__0_0.distcp").write_bytes(b"\0" * 64)
    return folder, marker


@pytest.mark.parametrize("command", [["list"], ["freeze", "*"], ["init", "*=zeros"]])
def test_malicious_metadata_is_refused(tmp_path: Path, command: list[str]) -> None:
    folder, marker = evil_folder(tmp_path)
    before = snapshot(folder)
    res = run_cli(command[0], folder, *command[1:])
    assert res.returncode == 1, res.stderr
    line = one_error_line(res)
    assert "os.system" in line
    assert not marker.exists(), "code from .metadata ran"
    assert snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil"]


def test_malicious_metadata_hint_is_actionable(tmp_path: Path) -> None:
    """Without the flag the refusal names the global and the way out; --unsafe-load really
    is that way out: DCP's own reader unpickles .metadata, and so runs its code (which is
    exactly what the flag gives up). Either way the result is one line, no traceback."""
    folder, marker = evil_folder(tmp_path)
    res = run_cli("list", folder)
    line = one_error_line(res)
    assert res.returncode == 1
    assert "os.system" in line and "--unsafe-load" in line
    assert not marker.exists()
    res = run_cli("list", folder, "--unsafe-load")
    assert res.returncode == 1  # the payload returns an int, not DCP metadata
    one_error_line(res)
    assert marker.exists(), "--unsafe-load should hand the file to torch's own reader"


# -- torchrun --------------------------------------------------------------------------------
RULES = ["model.head.weight=normal(std=0.5)", "model.enc.weight=uniform(a=-2, b=2)",
         "model.blocks.1=zeros"]


def test_torchrun_matches_single_process(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Two gloo ranks with --seed produce the tensors one process produces (slow: ~10 s)."""
    multi, single = tmp_path / "multi", tmp_path / "single"
    sd = save_dcp(multi)
    save_dcp(single)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "paramctl", "init", str(multi), *RULES, "--seed", "3"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    res1 = run(capsys, "init", single, *RULES, "--seed", "3")
    assert res1.returncode == 0, res1.stderr
    a, b = load_dcp(multi), load_dcp(single)
    assert idents(flat(a)) == idents(flat(b))
    assert non_tensors(a) == NON_TENSORS
    assert not torch.equal(flat(a)["model.head.weight"], flat(sd)["model.head.weight"])
    assert ident(flat(a)["model.enc.bias"]) == ident(flat(sd)["model.enc.bias"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi", "single"]


def test_torchrun_without_seed_exits_2(ckpt: tuple[Path, dict[str, Any]]) -> None:
    folder, _ = ckpt
    before = snapshot(folder)
    # exactly what each torchrun worker sees (WORLD_SIZE > 1): a usage error before any work
    res = run_cli("init", folder, "model.scale=zeros",
                  env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    assert res.returncode == 2, res.stderr
    assert "--seed" in one_error_line(res)
    # and through the real launcher: the worker's exit code is 2
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "paramctl", "init", str(folder), "model.scale=zeros"],
        capture_output=True, text=True, cwd=folder.parent, env=env, timeout=300)
    assert res.returncode != 0
    assert "error: running under torchrun: pass --seed" in res.stderr
    assert "exitcode  : 2" in res.stderr or "exitcode: 2" in res.stderr, res.stderr[-2000:]
    assert snapshot(folder) == before
