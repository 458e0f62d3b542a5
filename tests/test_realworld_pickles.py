"""Every real checkpoint, read without running a line of its code.

Real files, made by the software that makes them: a Lightning ``Trainer`` checkpoint (an
``argparse.Namespace``, a dataclass and an enum in its hyper-parameters, numpy scalars in
a callback's state), training dicts with numpy metrics, ``pathlib`` paths and
``functools.partial``; whole pickled modules (``torch.save(model)``) with frozen parts,
BatchNorm buffers, a non-persistent buffer and tied weights; ``keep_vars=True`` state dicts;
legacy (pre-1.6, non-zip) files. Each is listed, frozen and initialised WITHOUT
``--unsafe-load``; what torch then loads from the result (``weights_only=False``, in this
process, where the classes are importable) has the flags and values paramctl reported and
the same non-tensor content, and every pickle byte outside the spliced spans is unchanged.
``torch.load(weights_only=True)`` refuses the same files (the control). Hostile variants
never run: their markers never appear, and the outcome is a listing or one error line.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import pathlib
import pickle
import resource
import shutil
import struct
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import list_json_in_fresh_python, one_error_line, run_cli
from realworld_models import (
    Stage,
    TiedNet,
    TinyNet,
    TrainConfig,
    lightning_checkpoint,
    tied_model,
    tiny_state,
)
from torch import nn

import paramctl
from paramctl.core import change, inspect
from paramctl.rules import Step
from paramctl.sources.base import OpenOptions
from paramctl.sources.pt import PtSource
from sample_models.cnn import SmallCNN

REPO = Path(__file__).resolve().parent.parent

# What torch.save writes for a frozen nn.Parameter around a tensor expression, and so what a
# freeze splices around a plain state-dict tensor (the bool flips on unfreeze).
PARAM_PREFIX = b"ctorch._utils\n_rebuild_parameter\n"
FROZEN_SUFFIX = b"\x89ccollections\nOrderedDict\n)R\x87R"


@pytest.fixture(scope="module")
def realworld(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """name -> (read-only file, key of its state dict)."""
    out = tmp_path_factory.mktemp("realworld")
    lightning_checkpoint(out / "lightning.ckpt")
    state = tiny_state()
    torch.save({"state_dict": state, "epoch": 4,
                "metrics": {"val_loss": np.float32(0.5), "acc": np.float64(0.9),
                            "steps": np.int64(700), "per_class": np.arange(3.0)}},
               out / "numpy_metric.pt")
    torch.save({"model": state, "config": TrainConfig(widths=(8, 8)), "epoch": 2},
               out / "dataclass_config.pt")
    torch.save({"state_dict": state, "stage": Stage.FINETUNE,
                "out_dir": pathlib.PosixPath("/runs/7"),
                "activation": functools.partial(nn.functional.leaky_relu, negative_slope=0.2),
                "args": argparse.Namespace(seed=3, tags={"a", "b"})},
               out / "enum_path_partial.pt")
    return {"lightning": (out / "lightning.ckpt", "state_dict"),
            "numpy-metric": (out / "numpy_metric.pt", "state_dict"),
            "dataclass-config": (out / "dataclass_config.pt", "model"),
            "enum-path-partial": (out / "enum_path_partial.pt", "state_dict")}


FILES = ["lightning", "numpy-metric", "dataclass-config", "enum-path-partial"]
STATE_NAMES = list(TinyNet().state_dict())


# -- helpers ---------------------------------------------------------------------------------
def load_full(path: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=False)


def listed(path: Path, *extra: str) -> dict[str, Any]:
    res = run_cli("list", path, "-f", "json", *extra)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def ok(*args: object) -> subprocess.CompletedProcess[str]:
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    return res


def zip_records(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def data_pkl(records: dict[str, bytes]) -> bytes:
    return next(v for k, v in records.items() if k.endswith("/data.pkl") and k.count("/") == 1)


def spliced(old: bytes, inserts: list[tuple[int, bytes]],
            replaces: dict[tuple[int, int], bytes] | None = None) -> bytes:
    """``old`` with ``inserts`` (position, bytes; in order at one position) and byte ranges
    replaced: what a rewrite may change, and nothing else."""
    edits = sorted([(pos, pos, data) for pos, data in inserts]
                   + [(s, e, data) for (s, e), data in (replaces or {}).items()],
                   key=lambda t: t[0])
    out, cursor = [], 0
    for start, end, data in edits:
        out += [old[cursor:start], data]
        cursor = end
    out.append(old[cursor:])
    return b"".join(out)


def content(value: Any) -> Any:
    """A comparable picture of a loaded checkpoint (tensors by dtype, shape and values)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", type(value).__name__, str(value.dtype), tuple(value.shape),
                value.detach().tolist(), value.requires_grad)
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype.str, value.tolist())
    if isinstance(value, np.generic):
        return (type(value), value.item())
    if isinstance(value, functools.partial):
        return ("partial", value.func, value.args, value.keywords)
    if isinstance(value, dict):
        return {k: content(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(content(v) for v in value)
    return value


def storage_records(path: Path, names: list[str]) -> set[str]:
    """The zip records holding the storages of ``names``."""
    source = PtSource(str(path), OpenOptions())
    return {f"{source.prefix}data/{source.tensors[n].storage.key}" for n in names}


# -- the control ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FILES)
def test_weights_only_refuses_them(realworld: dict[str, tuple[Path, str]], name: str) -> None:
    """torch's own safe loader cannot read these files: what paramctl reads is not."""
    with pytest.raises(pickle.UnpicklingError):
        torch.load(realworld[name][0], weights_only=True)


# -- training checkpoints ---------------------------------------------------------------------
@pytest.mark.parametrize("name", FILES)
def test_lists_without_unsafe_load(realworld: dict[str, tuple[Path, str]], name: str) -> None:
    path, key = realworld[name]
    res = run_cli("list", path, "-f", "json")
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""  # no warning: nothing unsafe happened
    doc = json.loads(res.stdout)
    expected = load_full(path)[key]
    assert [p["name"] for p in doc["parameters"]] == STATE_NAMES
    for p in doc["parameters"]:
        assert p["shape"] == list(expected[p["name"]].shape)
        assert p["dtype"] == str(expected[p["name"]].dtype).removeprefix("torch.")
    flags = {p["name"]: p["requires_grad"] for p in doc["parameters"]}
    assert flags["layer.weight"] and flags["head.bias"]
    assert not flags["bn.num_batches_tracked"]


@pytest.mark.parametrize("name", ["lightning", "enum-path-partial"])
def test_listing_is_torch_free(realworld: dict[str, tuple[Path, str]], name: str) -> None:
    res = list_json_in_fresh_python(realworld[name][0])
    assert res.stderr.strip().splitlines()[-1] == "RESULT 0 []", res.stderr
    assert [p["name"] for p in json.loads(res.stdout)["parameters"]] == STATE_NAMES


@pytest.mark.parametrize("name", FILES)
def test_freeze_and_init_rewrite(realworld: dict[str, tuple[Path, str]], name: str,
                                 tmp_path: Path) -> None:
    original, key = realworld[name]
    path = tmp_path / original.name
    shutil.copyfile(original, path)
    before = zip_records(path)
    spans = PtSource(str(path), OpenOptions()).tensors

    ok("freeze", path, "layer.*")
    ok("init", path, "layer.bias=zeros", "--seed", "0")

    doc = listed(path)
    frozen = {p["name"] for p in doc["parameters"] if not p["requires_grad"]}
    # BatchNorm statistics are buffers (by name): never trainable, listed as such.
    assert frozen == {"layer.weight", "layer.bias", "bn.num_batches_tracked",
                      "bn.running_mean", "bn.running_var"}
    assert {p["name"] for p in doc["parameters"] if p["buffer"]} == {
        "bn.num_batches_tracked", "bn.running_mean", "bn.running_var"}

    # What torch loads: same non-tensor content, the flags and values paramctl reported.
    old, new = load_full(original), load_full(path)
    assert content({k: v for k, v in new.items() if k != key}) == \
        content({k: v for k, v in old.items() if k != key})
    old_state, new_state = old[key], new[key]
    assert list(new_state) == STATE_NAMES
    for n, t in new_state.items():
        if n.startswith("layer."):
            assert isinstance(t, nn.Parameter) and not t.requires_grad, n
        else:
            assert type(t) is torch.Tensor, n
        want = torch.zeros_like(old_state[n]) if n == "layer.bias" else old_state[n]
        assert torch.equal(t.detach(), want), n
    if name == "lightning":
        hparams = new["hyper_parameters"]
        assert hparams["args"] == argparse.Namespace(lr=0.1, name="run-7", layers=[4, 3])
        assert hparams["config"] == TrainConfig() and hparams["stage"] is Stage.PRETRAIN
        best = next(iter(new["callbacks"].values()))["best"]
        assert type(best) is np.float64 and best == 0.125
    if name == "numpy-metric":
        assert type(new["metrics"]["val_loss"]) is np.float32

    # Bytes: the pickle gained exactly the two Parameter wrappers; only layer.bias's
    # storage record changed; every other record is byte-identical.
    after = zip_records(path)
    inserts = [(spans[n].span[0], PARAM_PREFIX) for n in ("layer.weight", "layer.bias")]
    inserts += [(spans[n].span[1], FROZEN_SUFFIX) for n in ("layer.weight", "layer.bias")]
    inserts.sort(key=lambda t: (t[0], t[1] == PARAM_PREFIX))
    assert data_pkl(after) == spliced(data_pkl(before), inserts)
    changed = {k for k in before if before[k] != after.get(k)}
    assert changed == {next(k for k in before if k.endswith("/data.pkl"))} | \
        storage_records(original, ["layer.bias"])
    assert set(after) == set(before)


# -- whole pickled modules --------------------------------------------------------------------
@pytest.fixture(scope="module")
def module_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("modules")
    torch.save(tied_model(), out / "module.pt")
    torch.save({"model": tied_model(), "epoch": 3, "config": TrainConfig()},
               out / "wrapped_module.pt")
    return {"module": out / "module.pt", "wrapped": out / "wrapped_module.pt"}


def _module_of(loaded: Any) -> TiedNet:
    model = loaded if isinstance(loaded, nn.Module) else loaded["model"]
    assert isinstance(model, TiedNet)
    return model


@pytest.mark.parametrize("which", ["module", "wrapped"])
def test_module_lists_like_named_parameters(module_files: dict[str, Path], which: str) -> None:
    model = tied_model()
    doc = listed(module_files[which])
    params = list(model.named_parameters(remove_duplicate=False))
    buffers = list(model.named_buffers())
    assert [p["name"] for p in doc["parameters"]] == [n for n, _ in params + buffers]
    by_name = {p["name"]: p for p in doc["parameters"]}
    for n, p in params:
        assert by_name[n]["requires_grad"] == p.requires_grad, n
        assert not by_name[n]["buffer"]
    for n, _ in buffers:
        assert by_name[n]["buffer"] and not by_name[n]["requires_grad"], n
    assert "scale" in by_name  # non-persistent: pickled with the module, named_buffers() too
    assert by_name["embed.weight"]["tied"] == ["head.weight"]
    assert by_name["head.weight"]["tied"] == ["embed.weight"]
    assert all(by_name[n]["tied"] is None for n in by_name if n not in
               ("embed.weight", "head.weight"))
    totals = doc["totals"]
    assert totals["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert totals["frozen"] == sum(p.numel() for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("which", ["module", "wrapped"])
def test_module_freeze_unfreeze_init(module_files: dict[str, Path], which: str,
                                     tmp_path: Path) -> None:
    path = tmp_path / module_files[which].name
    shutil.copyfile(module_files[which], path)
    source = PtSource(str(path), OpenOptions())
    old_pkl = data_pkl(zip_records(path))

    ok("freeze", path, "encoder.3")
    ok("unfreeze", path, "encoder.0.bias")
    ok("init", path, "encoder.0.bias=zeros", "--seed", "0")
    res = ok("freeze", path, "head", "--dry-run")
    assert "embed.weight" in res.stdout  # freezing one name of a tied group freezes the group

    doc = listed(path)
    flags = {p["name"]: p["requires_grad"] for p in doc["parameters"] if not p["buffer"]}
    assert flags == {"embed.weight": True, "encoder.0.weight": False, "encoder.0.bias": True,
                     "encoder.1.weight": True, "encoder.1.bias": True,
                     "encoder.3.weight": False, "head.weight": True}

    original = _module_of(load_full(module_files[which]))
    model = _module_of(load_full(path))
    assert model.head.weight is model.embed.weight  # the tie survives the rewrite
    assert {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)} \
        == flags
    old_tensors = dict(original.named_parameters()) | dict(original.named_buffers())
    for n, t in (dict(model.named_parameters()) | dict(model.named_buffers())).items():
        want = torch.zeros_like(t) if n == "encoder.0.bias" else old_tensors[n]
        assert torch.equal(t.detach(), want.detach()), n
    with torch.no_grad():
        model.eval()(torch.randint(0, 10, (3,)))  # a working module, code and all

    # Module Parameters are flipped in place: the pickle differs in two bool bytes only.
    flips = {source.tensors[n].grad_span: b"\x88" if want else b"\x89"
             for n, want in (("encoder.3.weight", False), ("encoder.0.bias", True))}
    assert all(span is not None for span in flips)
    assert data_pkl(zip_records(path)) == spliced(old_pkl, [], flips)  # type: ignore[arg-type]


def test_module_freeze_of_tied_group_and_buffers(module_files: dict[str, Path],
                                                 tmp_path: Path) -> None:
    path = tmp_path / "module.pt"
    shutil.copyfile(module_files["module"], path)
    planned = change(str(path), [Step("freeze", patterns=("head", "encoder.1"))], dry_run=True)
    assert planned.skipped == ["encoder.1.running_mean", "encoder.1.running_var",
                               "encoder.1.num_batches_tracked"]  # buffers never freeze
    res = ok("freeze", path, "head", "encoder.1")
    assert res.stdout.split("\n")[0].split("\t")[:2] == ["embed.weight", "freeze"]  # the group
    model = _module_of(load_full(path))
    assert model.head.weight is model.embed.weight
    assert not model.embed.weight.requires_grad
    assert not model.encoder[1].weight.requires_grad
    assert type(model.encoder[1].running_mean) is torch.Tensor  # buffers stay buffers
    res = run_cli("init", path, "encoder.1.running_mean=zeros")
    assert res.returncode == 1
    assert "buffer" in one_error_line(res)


def test_load_state_dict_from_a_pickled_module(module_files: dict[str, Path]) -> None:
    """The API loads a whole-module file into a fresh model, flags included, without
    unpickling it (the non-persistent buffer is not part of a state dict)."""
    model = TiedNet()
    result = paramctl.load_state_dict(model, module_files["module"])
    assert result.missing_keys == [] and result.unexpected_keys == []
    expected = tied_model()
    for n, t in expected.state_dict().items():
        assert torch.equal(model.state_dict()[n], t), n
    assert not model.encoder[0].weight.requires_grad and model.embed.weight.requires_grad


# -- keep_vars state dicts and paramctl's own marks ----------------------------------------------
def frozen_backbone_cnn() -> SmallCNN:
    torch.manual_seed(0)
    model = SmallCNN()
    model.features.requires_grad_(False)
    model.classifier.requires_grad_(True)
    return model


def test_keep_vars_state_dict_knows_its_buffers(tmp_path: Path) -> None:
    """The issue's case: a frozen-backbone model with BatchNorm saved with keep_vars showed
    trainable 66 where the model has 34; the plain tensors beside Parameters are buffers."""
    model = frozen_backbone_cnn()
    path = tmp_path / "keep_vars.pt"
    torch.save(model.state_dict(keep_vars=True), path)
    doc = listed(path)
    buffers = [p["name"] for p in doc["parameters"] if p["buffer"]]
    assert buffers == [n for n, _ in model.named_buffers()]
    assert all(not p["requires_grad"] for p in doc["parameters"] if p["buffer"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert doc["totals"]["trainable"] == trainable == 170
    assert doc["totals"]["frozen"] == sum(p.numel() for p in model.parameters()
                                          if not p.requires_grad)
    planned = change(str(path), [Step("freeze", patterns=("*",))], dry_run=True)
    assert set(planned.skipped) == set(buffers)  # reported, never frozen
    res = ok("freeze", path, "*")
    assert [line.split("\t")[0] for line in res.stdout.splitlines()] == \
        ["classifier.weight", "classifier.bias"]
    state = torch.load(path, weights_only=True)
    assert all(isinstance(state[n], nn.Parameter) and not state[n].requires_grad
               for n, _ in model.named_parameters())
    assert all(type(state[n]) is torch.Tensor for n in buffers)


def test_paramctl_frozen_marks_are_not_keep_vars(tmp_path: Path) -> None:
    """A plain state dict paramctl froze, then unfroze, holds trainable Parameters beside
    plain tensors; they are paramctl's marks, so no parameter turns into a buffer. The
    same for paramctl.save_module's files (frozen entries as Parameters)."""
    model = frozen_backbone_cnn()
    path = tmp_path / "plain.pt"
    torch.save(model.state_dict(), path)
    ok("freeze", path, "features.0")
    ok("unfreeze", path, "features.0")
    doc = listed(path)
    # Only the BatchNorm statistics are buffers (by their names), not the parameters.
    stats = {f"features.{i}.{s}" for i in (1, 4)
             for s in ("num_batches_tracked", "running_mean", "running_var")}
    assert {p["name"] for p in doc["parameters"] if p["buffer"]} == stats
    assert {p["name"] for p in doc["parameters"] if not p["requires_grad"]} == stats

    saved = tmp_path / "saved.pt"
    paramctl.save_module(model, saved)
    doc = listed(saved)
    assert {p["name"] for p in doc["parameters"] if p["buffer"]} == stats
    assert {p["name"] for p in doc["parameters"] if p["requires_grad"]} >= \
        {"classifier.weight", "classifier.bias"}


# -- legacy (pre-1.6, non-zip) files ----------------------------------------------------------
def legacy_save(obj: Any, path: Path) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    return path


def brief(params: list[Any]) -> list[tuple[Any, ...]]:
    return [(p.name, p.shape, p.dtype, p.requires_grad, p.buffer, p.tied) for p in params]


@pytest.mark.parametrize("sample", ["cnn", "transformer", "transformer_nested"])
def test_legacy_lists_like_the_zip_file(samples_dir: Path, tmp_path: Path, sample: str) -> None:
    """The same object saved in both formats lists the same (tied names included)."""
    zip_path = samples_dir / f"{sample}.pt"
    obj = torch.load(zip_path, weights_only=True)
    legacy = legacy_save(obj, tmp_path / f"{sample}_legacy.pt")
    assert brief(inspect(str(legacy)).params) == brief(inspect(str(zip_path)).params)


def test_legacy_listing_is_torch_free(samples_dir: Path, tmp_path: Path) -> None:
    legacy = legacy_save(torch.load(samples_dir / "cnn.pt", weights_only=True),
                         tmp_path / "cnn_legacy.pt")
    res = list_json_in_fresh_python(legacy)
    assert res.stderr.strip().splitlines()[-1] == "RESULT 0 []", res.stderr


def test_legacy_pickled_module_and_objects(tmp_path: Path) -> None:
    model = tied_model()
    path = legacy_save({"model": model, "args": argparse.Namespace(lr=1.0),
                        "stage": Stage.PRETRAIN}, tmp_path / "legacy_module.pt")
    doc = listed(path)
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)] + \
        [n for n, _ in model.named_buffers()]
    assert [p["name"] for p in doc["parameters"]] == names
    flags = {p["name"]: p["requires_grad"] for p in doc["parameters"]}
    assert flags == {**{n: p.requires_grad for n, p in
                        model.named_parameters(remove_duplicate=False)},
                     **{n: False for n, _ in model.named_buffers()}}


def test_legacy_rewrite_goes_to_a_new_file(samples_dir: Path, tmp_path: Path) -> None:
    state = torch.load(samples_dir / "cnn.pt", weights_only=True)
    legacy = legacy_save(state, tmp_path / "cnn_legacy.pt")
    before = legacy.read_bytes()
    res = run_cli("freeze", legacy, "features.0")
    assert res.returncode == 2
    line = one_error_line(res)
    assert "legacy" in line and "-o OUT.pt" in line
    assert legacy.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn_legacy.pt"]

    out = tmp_path / "cnn_zip.pt"
    ok("freeze", legacy, "features.0", "-o", out)
    ok("init", out, "classifier.bias=zeros")
    loaded = torch.load(out, weights_only=True)
    assert list(loaded) == list(state)
    for n, t in loaded.items():
        want = torch.zeros_like(t) if n == "classifier.bias" else state[n]
        assert torch.equal(t.detach(), want), n
        assert isinstance(t, nn.Parameter) == n.startswith("features.0."), n
    st_out = tmp_path / "cnn.safetensors"
    ok("unfreeze", legacy, "classifier", "-o", st_out)  # nothing changes; still written
    assert [p.name for p in inspect(str(st_out)).params] == list(state)


def test_legacy_load_state_dict(samples_dir: Path, tmp_path: Path) -> None:
    state = torch.load(samples_dir / "cnn.pt", weights_only=True)
    legacy = legacy_save(state, tmp_path / "cnn_legacy.pt")
    model = SmallCNN()
    paramctl.load_state_dict(model, legacy)
    for n, t in model.state_dict().items():
        assert torch.equal(t, state[n]), n


# -- the escape hatch ---------------------------------------------------------------------------
def test_unreadable_tensor_kind_refused_with_the_way_out(tmp_path: Path) -> None:
    """A quantized tensor has no torch-free description here: refused in one line naming
    torch's rebuild function, and --unsafe-load (with its warning) reads it with torch."""
    path = tmp_path / "quantized.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated, still saved
        q = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    torch.save({"w": q, "b": torch.zeros(2)}, path)
    res = run_cli("list", path)
    line = one_error_line(res)
    assert res.returncode == 1
    assert "_rebuild_qtensor" in line and "--unsafe-load" in line and "'w'" in line
    res = run_cli("list", path, "--unsafe-load", "-f", "names")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["w", "b"]
    assert res.stderr.startswith("warning: ")


# =============================================================================================
# hostile variants: markers never appear; a correct listing or one error line; bounded


class _Reduce:
    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.func, self.args


MEMORY_LIMIT = 1 << 30


def run_limited(*args: object, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    return subprocess.run(
        [sys.executable, "-m", "paramctl", *map(str, args)], capture_output=True, text=True,
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=timeout,
        preexec_fn=limit)


def _touch(marker: Path) -> _Reduce:
    return _Reduce(os.system, f"touch {marker}")


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "payload-ran"
    yield path
    assert not path.exists(), "a payload ran"


def test_payload_in_placeholder_state(tmp_path: Path, marker: Path) -> None:
    """A Namespace in the hyper-parameters whose attribute is os.system(...): listed by
    nothing, carried through a rewrite byte for byte, never run."""
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": tiny_state(),
                "hyper_parameters": {"args": argparse.Namespace(lr=0.1, evil=_touch(marker))}},
               path)
    assert [p["name"] for p in listed(path)["parameters"]] == STATE_NAMES
    ok("freeze", path, "layer.*")
    ok("init", path, "head.bias=zeros")
    assert f"touch {marker}".encode() in data_pkl(zip_records(path))
    assert {p.name for p in inspect(str(path)).params if not p.requires_grad} >= \
        {"layer.weight", "layer.bias"}


def test_module_with_os_system_reduce(tmp_path: Path, marker: Path) -> None:
    """os.system(...) as a module attribute is an inert placeholder beside the module's
    tensors; as a submodule or a parameter it is one error line. Never run either way."""
    model = tied_model()
    model.evil = _touch(marker)  # type: ignore[assignment]
    path = tmp_path / "attr.pt"
    torch.save(model, path)
    assert [p["name"] for p in listed(path)["parameters"]][:2] == ["embed.weight",
                                                                    "encoder.0.weight"]
    ok("freeze", path, "*")

    sub = tied_model()
    sub._modules["evil"] = _touch(marker)  # type: ignore[assignment]
    path = tmp_path / "submodule.pt"
    torch.save(sub, path)
    line = one_error_line(run_limited("list", path))
    assert "submodule 'evil'" in line and "system" in line and "--unsafe-load" in line

    param = tied_model()
    param.head._parameters["bias"] = _touch(marker)  # type: ignore[assignment]
    path = tmp_path / "parameter.pt"
    torch.save(param, path)
    line = one_error_line(run_limited("freeze", path, "*"))
    assert "parameter 'head.bias'" in line


def _pickle_with(extra: bytes, key: bytes = b"deep") -> bytes:
    """The data.pkl of a tiny state dict plus one more entry, ``extra``'s opcodes."""
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)
    pkl = data_pkl(zip_records_from(buf.getvalue()))
    assert pkl.endswith(b"u.") or pkl.endswith(b"s.")
    entry = b"X" + struct.pack("<I", len(key)) + key + extra + b"s"
    return pkl[:-1] + entry + b"."


def zip_records_from(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def with_pickle(tmp_path: Path, pkl: bytes, name: str = "crafted.pt") -> Path:
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)
    records = zip_records_from(buf.getvalue())
    key = next(k for k in records if k.endswith("/data.pkl"))
    records[key] = pkl
    path = tmp_path / name
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for k, v in records.items():
            zf.writestr(k, v)
    return path


def _reduce_chain(depth: int, module: bytes = b"os", name: bytes = b"system") -> bytes:
    """f(f(f(...f(1)))) ``depth`` calls deep, f memoised once."""
    return (b"c" + module + b"\n" + name + b"\nq\x00" + b"h\x00" * (depth - 1) + b"K\x01"
            + b"\x85R" * depth)


def _build_chain(depth: int) -> bytes:
    """Objects whose BUILD state holds the next object: {"child": {"child": ...}}."""
    obj = b"cargparse\nNamespace\nq\x01)\x81"
    return (obj + b"}X\x05\x00\x00\x00child") * depth + b"N" + b"sb" * depth


@pytest.mark.parametrize("extra", ["reduce-chain", "build-chain"])
def test_deeply_nested_placeholders(tmp_path: Path, extra: str) -> None:
    depth = 200_000
    body = _reduce_chain(depth) if extra == "reduce-chain" else _build_chain(depth)
    path = with_pickle(tmp_path, _pickle_with(body))
    res = run_limited("list", path, "-f", "names", timeout=60)
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["w"]
    # The same chain as the whole file: nothing to list, one bounded line.
    root = with_pickle(tmp_path, b"\x80\x02" + body + b".", "root.pt")
    line = one_error_line(run_limited("list", root))
    assert "no state dict" in line and len(line) < 500


def test_huge_build_state(tmp_path: Path) -> None:
    """A Namespace with 300,000 attributes beside the tensors lists fine under 1 GiB; BUILD
    merging two large dicts over and over hits the work budget instead of the memory."""
    def items(first: int, count: int) -> bytes:
        return b"".join(b"X" + struct.pack("<I", len(k)) + k + b"K\x01"
                        for k in (f"a{i}".encode() for i in range(first, first + count)))

    huge = b"cargparse\nNamespace\n)\x81}(" + items(0, 300_000) + b"ub"
    res = run_limited("list", with_pickle(tmp_path, _pickle_with(huge)), "-f", "names")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["w"]

    dicts = b"}q\x01(" + items(0, 100_000) + b"u0}q\x02(" + items(100_000, 100_000) + b"u0"
    merges = b"cargparse\nNamespace\n)\x81" + b"h\x01bh\x02b" * 5_000
    bomb = with_pickle(tmp_path, _pickle_with(dicts + merges), "merge.pt")
    line = one_error_line(run_limited("list", bomb, timeout=60))
    assert "far more data than it holds" in line


def test_module_tree_bombs(tmp_path: Path) -> None:
    # Each level holds the one below twice: 40 levels name 2**40 paths.
    dag = (b"\x80\x02cuser.models\nNet\n)\x81}(X\x0b\x00\x00\x00_parameters}X\x08\x00\x00\x00"
           b"_buffers}X\x08\x00\x00\x00_modules}ubq\x00")
    for level in range(1, 41):
        dag += (b"0cuser.models\nNet\n)\x81}(X\x0b\x00\x00\x00_parameters}X\x08\x00\x00\x00"
                b"_buffers}X\x08\x00\x00\x00_modules}(X\x01\x00\x00\x00ah" + bytes([level - 1])
                + b"X\x01\x00\x00\x00bh" + bytes([level - 1]) + b"uub" + b"q" + bytes([level]))
    path = with_pickle(tmp_path, dag + b".", "dag.pt")
    line = one_error_line(run_limited("list", path, timeout=60))
    assert "far more modules" in line

    # A module that contains itself (the memo makes a cycle).
    cycle = (b"\x80\x02cuser.models\nNet\n)\x81q\x00}(X\x0b\x00\x00\x00_parameters}X\x08\x00"
             b"\x00\x00_buffers}X\x08\x00\x00\x00_modules}X\x04\x00\x00\x00selfh\x00sub.")
    line = one_error_line(run_limited("list", with_pickle(tmp_path, cycle, "cycle.pt")))
    assert "contains itself" in line


def test_opaque_torch_rebuild_beside_the_state_is_carried(tmp_path: Path,
                                                          marker: Path) -> None:
    """torch functions this reader does not interpret are inert too: outside the listed
    state they are carried (never called), inside it they are refused, never skipped."""
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.ones(2)}, "extra": 12345}, buf)
    pkl = data_pkl(zip_records_from(buf.getvalue()))
    assert pkl.count(b"M90") == 1  # 12345 as BININT2
    beside = pkl.replace(b"M90", b"ctorch._utils\n_rebuild_qtensor\nK\x01\x85R")
    path = with_pickle(tmp_path, beside, "beside.pt")
    assert [p.name for p in inspect(str(path)).params] == ["w"]
    ok("freeze", path, "w")
    nested = _pickle_with(b"}X\x01\x00\x00\x00w" + b"ctorch._utils\n_rebuild_qtensor\nK\x01\x85R"
                          + b"s", b"ema")
    line = one_error_line(run_limited("list", with_pickle(tmp_path, nested, "inside.pt"),
                                      "--key", "ema"))
    assert "_rebuild_qtensor" in line and "--unsafe-load" in line
