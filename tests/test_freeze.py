"""`paramctl freeze` / `unfreeze` on real checkpoints: exact selection, bit-exact rewrites,
loadable results, tied groups, every way of naming parameters, and where the bytes go."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import folder_state
from helpers import run_inproc as run
from safetensors.torch import load_file, load_model
from torch import nn

import paramctl
from sample_models.cnn import SmallCNN
from sample_models.llama import Llama
from sample_models.mlp import MLP
from sample_models.transformer import TinyTransformer

CliFn = Callable[..., subprocess.CompletedProcess[str]]

MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": MLP, "cnn": SmallCNN, "transformer": TinyTransformer, "llama": Llama,
    "transformer_nested": TinyTransformer,
}


# -- helpers ---------------------------------------------------------------------------------
TensorBytes = dict[str, tuple[str, tuple[int, ...], bytes]]


def tensor_bytes(path: Path, key: str | None = None) -> TensorBytes:
    """name -> (dtype, shape, raw bytes) for every tensor, read by torch / safetensors."""
    if path.suffix == ".safetensors":
        tensors = load_file(str(path))
    else:
        root = torch.load(path, map_location="cpu", weights_only=True)
        tensors = root[key] if key else root
    return {
        name: (str(t.dtype), tuple(t.shape),
               t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        for name, t in tensors.items()
    }


def listed(cli: CliFn, path: Path, *extra: str) -> dict[str, dict[str, Any]]:
    res = cli("list", path, "-f", "json", *extra)
    assert res.returncode == 0, res.stderr
    return {p["name"]: p for p in json.loads(res.stdout)["parameters"]}


def frozen_in_listing(params: dict[str, dict[str, Any]]) -> set[str]:
    # Buffers (BatchNorm statistics in a file, by name) never train and are never frozen.
    return {n for n, p in params.items()
            if not p["requires_grad"] and not p["buffer"]
            and (p["dtype"].startswith(("float", "bfloat")))}


def st_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header: dict[str, Any] = json.loads(fh.read(n))
    return header


def st_data(path: Path) -> bytes:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return data[8 + n:]


def zip_records(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def temps(folder: Path) -> list[str]:
    return sorted(e.name for e in folder.iterdir() if ".paramctl-" in e.name)


# -- round trips -----------------------------------------------------------------------------
# (file, patterns, predicate for the names that must end up frozen)
CASES = [
    ("mlp.pt", ["layers.0"], lambda n: n.startswith("layers.0.")),
    ("mlp.safetensors", ["layers.0"], lambda n: n.startswith("layers.0.")),
    ("cnn.pt", ["features.0", "classifier.weight"],
     lambda n: n.startswith("features.0.") or n == "classifier.weight"),
    ("cnn.safetensors", ["features.0", "classifier.weight"],
     lambda n: n.startswith("features.0.") or n == "classifier.weight"),
    ("transformer.pt", ["blocks.0.attn"], lambda n: n.startswith("blocks.0.attn.")),
    ("transformer.safetensors", ["blocks.0.attn"], lambda n: n.startswith("blocks.0.attn.")),
    ("llama.pt", [r"re:^model\.layers\.0\..*_proj"],
     lambda n: n.startswith("model.layers.0.") and "_proj" in n),
    ("llama.safetensors", ["*.layers.1.*", "lm_head"],
     lambda n: ".layers.1." in n or n.startswith("lm_head")),
    ("transformer_nested.pt", ["blocks.1", "norm"],
     lambda n: n.startswith(("blocks.1.", "norm."))),
]


@pytest.mark.parametrize(("name", "patterns", "expected"), CASES, ids=[c[0] for c in CASES])
def test_freeze_round_trip(sample: Callable[[str], Path], samples_dir: Path, cli: CliFn,
                           name: str, patterns: list[str],
                           expected: Callable[[str], bool]) -> None:
    path = sample(name)
    original = samples_dir / name
    key = "model" if name == "transformer_nested.pt" else None
    before_params = listed(cli, path)
    before_tensors = tensor_bytes(path, key)
    before_records = zip_records(path) if path.suffix == ".pt" else {}
    before_meta = st_header(path).get("__metadata__", {}) if path.suffix == ".safetensors" else {}
    want = {n for n in before_params if expected(n)}
    assert want and not frozen_in_listing(before_params)

    res = cli("freeze", path, *patterns)
    assert res.returncode == 0, res.stderr
    assert {line.split("\t")[0] for line in res.stdout.splitlines()} == want

    after_params = listed(cli, path)
    assert list(after_params) == list(before_params)  # same names, same order
    assert frozen_in_listing(after_params) == want
    assert set(paramctl.frozen_names(path)) == want
    for n, p in after_params.items():  # shapes, dtypes and sizes unchanged
        assert {k: v for k, v in p.items() if k != "requires_grad"} == \
            {k: v for k, v in before_params[n].items() if k != "requires_grad"}

    # every tensor byte-identical
    assert tensor_bytes(path, key) == before_tensors

    model = MODELS[name.split(".")[0]]()
    if path.suffix == ".pt":
        after_records = zip_records(path)
        assert set(after_records) == set(before_records)
        for rec, data in before_records.items():
            if not rec.endswith("/data.pkl"):
                assert after_records[rec] == data, rec
        root = torch.load(path, map_location="cpu", weights_only=True)
        state = root[key] if key else root
        for n, t in state.items():
            if n in want:
                assert isinstance(t, nn.Parameter) and not t.requires_grad, n
        model.load_state_dict(state, strict=True)
        mm = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        mm_state = mm[key] if key else mm
        assert all(torch.equal(mm_state[n], state[n]) for n in state)
        if key:
            before_root = torch.load(original, weights_only=True)
            assert set(root) == set(before_root)
            assert root["epoch"] == before_root["epoch"] == 3
            assert root["config"] == before_root["config"]
            _assert_same_tree(root["optimizer"], before_root["optimizer"])
    else:
        meta = st_header(path)["__metadata__"]
        for k, v in before_meta.items():
            assert meta[k] == v
        assert json.loads(meta["paramctl.frozen"]) == sorted(want)
        assert set(meta) == {*before_meta, "paramctl.frozen"}
        assert st_data(path) == st_data(original)
        load_model(model, str(path), strict=True)

    fresh = MODELS[name.split(".")[0]]()
    result = paramctl.load_state_dict(fresh, path, key=key)
    assert list(result.missing_keys) == [] and list(result.unexpected_keys) == []
    for n, p in fresh.named_parameters(remove_duplicate=False):
        assert p.requires_grad == (n not in want), n
    for n, p in fresh.state_dict().items():
        if n in before_tensors:
            raw = p.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            assert raw == before_tensors[n][2], n

    # freezing again changes nothing and does not rewrite the file
    stamp = folder_state(path.parent)
    res = cli("freeze", path, *patterns)
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""
    assert folder_state(path.parent) == stamp


def _loaded(path: Path, key: str | None) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        return dict(load_file(str(path)))
    root = torch.load(path, weights_only=True)
    return dict(root[key] if key else root)


def _assert_same_tree(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            _assert_same_tree(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same_tree(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("name", ["mlp.pt", "mlp.safetensors", "transformer_nested.pt"])
def test_freeze_unfreeze_cycles_stay_consistent(sample: Callable[[str], Path],
                                                samples_dir: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                name: str) -> None:
    path = sample(name)
    key = "model" if "nested" in name else None
    names = list(tensor_bytes(path, key))
    original_tensors = tensor_bytes(path, key)
    pattern = "layers.1" if name.startswith("mlp") else "blocks.0.mlp"
    picked = {n for n in names if n.startswith(pattern + ".")}

    assert run(capsys, "freeze", path, pattern).returncode == 0
    after_first = path.read_bytes()
    assert set(paramctl.frozen_names(path)) == picked
    for cycle in range(3):
        res = run(capsys, "unfreeze", path, pattern)
        assert res.returncode == 0, res.stderr
        assert paramctl.frozen_names(path) == [], cycle
        res = run(capsys, "freeze", path, pattern)
        assert res.returncode == 0, res.stderr
        assert set(paramctl.frozen_names(path)) == picked
        if cycle == 0:  # flipping the same flags back gives back the same file
            assert path.read_bytes() == after_first
        res = run(capsys, "freeze", path, "*", "--exclude", pattern)
        assert res.returncode == 0, res.stderr
        assert set(paramctl.frozen_names(path)) == set(names), cycle
        res = run(capsys, "unfreeze", path, "*", "!" + pattern)
        assert res.returncode == 0, res.stderr
        assert set(paramctl.frozen_names(path)) == picked
        res = run(capsys, "unfreeze", path, "*")
        assert res.returncode == 0, res.stderr
        assert paramctl.frozen_names(path) == []
        assert not any(p.requires_grad is False and n in names for n, p in
                       _loaded(path, key).items() if isinstance(p, nn.Parameter))
        res = run(capsys, "freeze", path, pattern)
        assert res.returncode == 0, res.stderr
        assert set(paramctl.frozen_names(path)) == picked
        assert tensor_bytes(path, key) == original_tensors
        model = MODELS[name.split(".")[0]]()
        paramctl.load_state_dict(model, path, key=key)
        assert {n for n, p in model.named_parameters() if not p.requires_grad} == picked
    if key:
        root = torch.load(path, weights_only=True)
        assert root["epoch"] == 3 and root["config"] == {"vocab": 64, "dim": 32}
        _assert_same_tree(root["optimizer"],
                          torch.load(samples_dir / name, weights_only=True)["optimizer"])


def test_unfreeze_removes_names(sample: Callable[[str], Path], cli: CliFn) -> None:
    st = sample("transformer.safetensors")
    pt = sample("transformer.pt")
    for path in (st, pt):
        assert cli("freeze", path, "*").returncode == 0
        res = cli("unfreeze", path, "blocks.1", "norm")
        assert res.returncode == 0, res.stderr
        frozen = set(paramctl.frozen_names(path))
        assert frozen and not any(n.startswith(("blocks.1.", "norm.")) for n in frozen)
        assert "blocks.0.mlp.fc1.weight" in frozen
        res = cli("unfreeze", path, "*")
        assert res.returncode == 0, res.stderr
        assert paramctl.frozen_names(path) == []
        assert not frozen_in_listing(listed(cli, path))
    meta = st_header(st)["__metadata__"]
    assert json.loads(meta.get("paramctl.frozen", "[]")) == []
    assert meta["format"] == "pt" and meta["lm_head.weight"] == "embed.weight"


def test_tied_group_is_frozen_together(sample: Callable[[str], Path], cli: CliFn) -> None:
    path = sample("transformer.pt")
    original = tensor_bytes(path)
    res = cli("freeze", path, "embed", "-f", "table")
    assert res.returncode == 0, res.stderr
    assert "lm_head.weight" in res.stdout and "tied" in res.stdout
    assert set(paramctl.frozen_names(path)) == {"embed.weight", "lm_head.weight"}
    state = torch.load(path, weights_only=True)
    assert not state["embed.weight"].requires_grad and not state["lm_head.weight"].requires_grad
    assert state["embed.weight"].untyped_storage().data_ptr() == \
        state["lm_head.weight"].untyped_storage().data_ptr()
    assert tensor_bytes(path) == original
    model = TinyTransformer()
    paramctl.load_state_dict(model, path)
    assert not model.embed.weight.requires_grad and model.lm_head.weight is model.embed.weight

    # plain (tsv) output names the tie in its via column; unfreezing the other name works too
    res = cli("unfreeze", path, "lm_head")
    assert res.returncode == 0, res.stderr
    rows = {r.split("\t")[0]: r.split("\t") for r in res.stdout.splitlines()}
    assert set(rows) == {"embed.weight", "lm_head.weight"}
    assert rows["embed.weight"][2] == "lm_head.weight"
    assert paramctl.frozen_names(path) == []


# -- naming what to freeze -------------------------------------------------------------------
def test_exclude_and_bang_agree(sample: Callable[[str], Path],
                                capsys: pytest.CaptureFixture[str]) -> None:
    a, b = sample("transformer.pt"), sample("transformer.safetensors")
    assert run(capsys, "freeze", a, "blocks.0", "--exclude", "*.bias", "-x",
               "blocks.0.norm1").returncode == 0
    assert run(capsys, "freeze", b, "blocks.0", "!*.bias", "!blocks.0.norm1").returncode == 0
    want = {n for n in tensor_bytes(a) if n.startswith("blocks.0.")
            and not n.endswith(".bias") and not n.startswith("blocks.0.norm1.")}
    assert set(paramctl.frozen_names(a)) == want == set(paramctl.frozen_names(b))


def test_names_from_file(sample: Callable[[str], Path], tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    path = sample("llama.safetensors")
    names_file = tmp_path / "names.txt"
    names_file.write_text("# chosen by hand\n\nmodel.norm.weight\n"
                          "  model.layers.1.mlp.up_proj.weight  \nlm_head.weight\n")
    res = run(capsys, "freeze", path, "--names-from", names_file)
    assert res.returncode == 0, res.stderr
    assert set(paramctl.frozen_names(path)) == {
        "model.norm.weight", "model.layers.1.mlp.up_proj.weight", "lm_head.weight"}
    # names are exact, not patterns: a near miss is a no-match error
    names_file.write_text("model.norm\n")
    stamp = folder_state(tmp_path)
    res = run(capsys, "freeze", path, "--names-from", names_file)
    assert res.returncode == 3
    assert folder_state(tmp_path) == stamp


def test_names_from_stdin_pipeline(sample: Callable[[str], Path], cli: CliFn) -> None:
    path = sample("transformer_nested.pt")
    names = cli("list", path, "-f", "names")
    assert names.returncode == 0, names.stderr
    attn = "".join(line + "\n" for line in names.stdout.splitlines() if ".attn." in line)
    res = cli("freeze", path, "--names-from", "-", input=attn)
    assert res.returncode == 0, res.stderr
    assert set(paramctl.frozen_names(path)) == set(attn.split())
    assert len(attn.split()) == 16


# -- where the result goes -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cnn.pt", "cnn.safetensors"])
def test_output_leaves_source_untouched(sample: Callable[[str], Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str], name: str) -> None:
    src = sample(name)
    before = folder_state(tmp_path)
    out = tmp_path / "sub" / f"out{src.suffix}"
    out.parent.mkdir()
    res = run(capsys, "freeze", src, "features", "-o", out)
    assert res.returncode == 0, res.stderr
    assert folder_state(tmp_path) == {**before, "sub": folder_state(tmp_path)["sub"]}
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
    # BatchNorm statistics are buffers (by name) and skipped, like the int64 counter
    want = {n for n, (dtype, _, _) in tensor_bytes(src).items()
            if n.startswith("features.") and "int" not in dtype and ".running_" not in n}
    assert set(paramctl.frozen_names(out)) == want
    assert paramctl.frozen_names(src) == []
    assert tensor_bytes(out) == tensor_bytes(src)


@pytest.mark.parametrize("command", [["freeze", "*"], ["init", "*=zeros"],
                                     ["convert", "--cast", "float16"]])
def test_unknown_output_type_is_refused_before_the_source_is_read(
        tmp_path: Path, cli: CliFn, command: list[str]) -> None:
    """A mistyped -o is named at once: before reading the source (whose header may take a
    second), so even a corrupt source gives the -o error, and nothing is written."""
    src = tmp_path / "bad.safetensors"
    src.write_bytes(b"\xff" * 64)  # not a safetensors header
    before = folder_state(tmp_path)
    res = cli(command[0], src, *command[1:], "-o", tmp_path / "out.st")
    assert res.returncode == 1, res.stderr
    assert res.stderr == (f"error: -o {tmp_path / 'out.st'}: unknown output type; use .pt, "
                          ".safetensors or a folder (sharded safetensors)\n")
    assert folder_state(tmp_path) == before


def test_in_place_keeps_mode(sample: Callable[[str], Path],
                             capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("mlp.pt", "mlp.safetensors"):
        path = sample(name)
        path.chmod(0o640)
        res = run(capsys, "freeze", path, "head")
        assert res.returncode == 0, res.stderr
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        assert set(paramctl.frozen_names(path)) == {"head.weight", "head.bias"}
        assert temps(path.parent) == []


def test_in_place_follows_symlink(sample: Callable[[str], Path], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    store.mkdir()
    for name in ("mlp.pt", "mlp.safetensors"):
        real = store / name
        shutil.move(sample(name), real)
        link = tmp_path / f"link-{name}"
        link.symlink_to(os.path.relpath(real, tmp_path))
        original = tensor_bytes(real)
        res = run(capsys, "freeze", link, "layers")
        assert res.returncode == 0, res.stderr
        assert link.is_symlink() and os.readlink(link) == os.path.relpath(real, tmp_path)
        assert real.is_file() and not real.is_symlink()
        assert set(paramctl.frozen_names(real)) == {
            "layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"}
        assert tensor_bytes(real) == original
    assert temps(tmp_path) == [] and temps(store) == []


def test_module_path_needs_output(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    res = run(capsys, "freeze", "sample_models.mlp:MLP", "layers.0")
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and "-o" in res.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_module_path_writes_checkpoint(tmp_path: Path, cli: CliFn,
                                      capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / f"x{suffix}"
    res = run(capsys, "freeze", "sample_models.mlp:MLP", "layers.0", "--arg", "hidden=24",
              "-o", out)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    want = {"layers.0.weight", "layers.0.bias"}
    assert set(paramctl.frozen_names(out)) == want
    assert frozen_in_listing(listed(cli, out)) == want
    model = MLP(hidden=24)
    if suffix == ".pt":
        state = torch.load(out, weights_only=True)
        model.load_state_dict(state, strict=True)
        assert not state["layers.0.weight"].requires_grad
    else:
        load_model(model, str(out), strict=True)
    fresh = MLP(hidden=24)
    paramctl.load_state_dict(fresh, out)
    assert {n for n, p in fresh.named_parameters() if not p.requires_grad} == want
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                 model.state_dict().values(), strict=True))


# -- writing nothing -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["transformer.pt", "transformer.safetensors"])
def test_dry_run_and_no_match_write_nothing(sample: Callable[[str], Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str],
                                            name: str) -> None:
    path = sample(name)
    out = tmp_path / f"out{path.suffix}"
    stamp = folder_state(tmp_path)

    res = run(capsys, "freeze", path, "blocks.0", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.splitlines()) == 16
    res = run(capsys, "freeze", path, "blocks.0", "--dry-run", "-f", "table")
    assert res.returncode == 0 and "dry run" in res.stdout
    res = run(capsys, "freeze", path, "*", "--dry-run", "-o", out)
    assert res.returncode == 0, res.stderr
    assert folder_state(tmp_path) == stamp

    # an exclude that matches nothing is not an error (it used to exit 3)
    for args in (["blocks.0", "--exclude", "nothing.here"], ["blocks.0", "!nothing"]):
        res = run(capsys, "freeze", path, *args, "--dry-run")
        assert res.returncode == 0, (args, res.stderr)
        assert len(res.stdout.splitlines()) == 16
    assert folder_state(tmp_path) == stamp

    for args in (["blocks.9"], ["blocks.0", "nope*"], ["re:^decoder\\."]):
        res = run(capsys, "freeze", path, *args)
        assert res.returncode == 3, (args, res.stderr)
        assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1
        assert res.stdout == ""
        res = run(capsys, "freeze", path, *args, "-o", out)
        assert res.returncode == 3
        assert folder_state(tmp_path) == stamp, args
    res = run(capsys, "unfreeze", path, "blocks.9")
    assert res.returncode == 3 and "blocks.9" in res.stderr
    assert folder_state(tmp_path) == stamp

    # with --allow-empty the unmatched pattern is accepted and the rest is applied
    res = run(capsys, "freeze", path, "blocks.9", "norm", "--allow-empty")
    assert res.returncode == 0, res.stderr
    assert set(paramctl.frozen_names(path)) == {"norm.weight", "norm.bias"}


def test_subprocess_dry_run(sample: Callable[[str], Path], tmp_path: Path, cli: CliFn) -> None:
    path = sample("mlp.pt")
    stamp = folder_state(tmp_path)
    res = cli("freeze", path, "layers.0", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert [r.split("\t") for r in res.stdout.splitlines()] == [
        ["layers.0.weight", "freeze", "", "true", "false"],
        ["layers.0.bias", "freeze", "", "true", "false"]]
    res = cli("freeze", path, "layer.0")
    assert res.returncode == 3
    assert "layer.0" in res.stderr and "layers.0" in res.stderr  # suggests the closest name
    assert folder_state(tmp_path) == stamp


def _edge_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, generator=g)
    state: dict[str, torch.Tensor] = {
        "views.a": base[:8], "views.b": base[8:24], "views.all": base,
        "t.weight": torch.randn(5, 7, generator=g).t(),
        "scalar": torch.tensor(1.5), "empty": torch.empty(0, 3),
        "half": torch.randn(6, generator=g).half(), "bf": torch.randn(6, generator=g).bfloat16(),
        "p.on": nn.Parameter(torch.randn(3, generator=g)),
        "p.off": nn.Parameter(torch.randn(3, generator=g), requires_grad=False),
        "ünï.weight": torch.randn(2, generator=g), "count": torch.tensor(7),
    }
    for i in range(300):  # enough entries for the pickle's long memo opcodes
        state[f"many.{i}.w"] = torch.randn(2, generator=g)
    return state


EDGE_PATTERNS = ["views.a", "t", "scalar", "empty", "half", "bf", "p.on", "ünï", "many.2*",
                 "count"]
EDGE_FROZEN = {"views.a", "t.weight", "scalar", "empty", "half", "bf", "p.on", "p.off",
               "ünï.weight", *(f"many.{i}.w" for i in [2, *range(20, 30), *range(200, 300)])}


@pytest.mark.parametrize("protocol", [2, 4])
def test_freeze_edge_case_torch_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           protocol: int) -> None:
    """Views into one storage at offsets, a transposed tensor, 0-d, empty, half types,
    existing Parameters, a non-ASCII name, 300 entries and a framed (protocol 4) pickle."""
    path = tmp_path / "edge.pt"
    torch.save(_edge_state(), path, pickle_protocol=protocol)
    original = torch.load(path, weights_only=False)
    records = zip_records(path)
    assert paramctl.frozen_names(path) == ["p.off"]

    res = run(capsys, "freeze", path, *EDGE_PATTERNS)
    assert res.returncode == 0, res.stderr
    assert set(paramctl.frozen_names(path)) == EDGE_FROZEN
    after = zip_records(path)
    assert {k: v for k, v in after.items() if not k.endswith("data.pkl")} == \
        {k: v for k, v in records.items() if not k.endswith("data.pkl")}
    state = torch.load(path, weights_only=protocol == 2)
    assert list(state) == list(original)
    for name, t in state.items():
        old = original[name]
        assert t.dtype == old.dtype and t.shape == old.shape and t.stride() == old.stride()
        assert t.storage_offset() == old.storage_offset() and torch.equal(t, old), name
        if name in EDGE_FROZEN:
            assert isinstance(t, nn.Parameter) and not t.requires_grad, name
    assert state["views.a"].untyped_storage().data_ptr() == \
        state["views.all"].untyped_storage().data_ptr()

    res = run(capsys, "unfreeze", path, "p", "views")
    assert res.returncode == 0, res.stderr
    assert set(paramctl.frozen_names(path)) == EDGE_FROZEN - {"p.on", "p.off", "views.a"}
    state = torch.load(path, weights_only=protocol == 2)
    assert state["p.off"].requires_grad and state["p.on"].requires_grad


def test_freeze_edge_case_safetensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in _edge_state().items()}
    path = tmp_path / "edge.safetensors"
    save_file(state, str(path), metadata={"format": "pt", "note": "ünïcode ✓"})
    data = st_data(path)
    res = run(capsys, "freeze", path, *EDGE_PATTERNS)
    assert res.returncode == 0, res.stderr
    assert set(paramctl.frozen_names(path)) == EDGE_FROZEN - {"p.off"}
    assert st_data(path) == data
    assert st_header(path)["__metadata__"]["note"] == "ünïcode ✓"
    assert st_header(path).keys() == {"__metadata__", *state}
    loaded = load_file(str(path))
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in state.items())
