"""Checkpoints as the fine-tuning ecosystem leaves them, written by the real libraries:
torch zips under any name (``.pth.tar``, ``.pkl``, none), Hugging Face ``save_pretrained``
folders holding one weights file, sharded ``.bin`` folders, PEFT adapter folders, buffers
recognised by name in plain state dicts, and a zip whose damage looks like encryption.

transformers 5 always saves safetensors (``save_pretrained(safe_serialization=False)`` is
gone); the ``pytorch_model.bin`` layouts are written by ``huggingface_hub.
save_torch_state_dict(safe_serialization=False)``: the same file names, index and
``torch.save`` shards transformers 4.x wrote, which transformers 5 still loads.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import folder_state, one_error_line
from helpers import run_inproc as run
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import paramctl
from paramctl.model import BUFFER_NAMES, ParamInfo, mark_buffers

Sample = Callable[[str], Path]


@pytest.fixture(autouse=True)
def _quiet_hf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def list_json(capsys: pytest.CaptureFixture[str], *args: object) -> dict[str, Any]:
    res = run(capsys, "list", *args, "-f", "json")
    assert res.returncode == 0, res.stderr
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def shapes(doc: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {p["name"]: (tuple(p["shape"]), p["dtype"]) for p in doc["parameters"]}


def described(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in tensors.items()}


# =======================================================================================
# 1. torch zips and safetensors recognised by content
# =======================================================================================
@pytest.mark.parametrize("name", ["ckpt.pth.tar", "ckpt.pkl", "model_best", "CKPT.PT"])
def test_torch_zip_under_any_name_lists_and_freezes(
        name: str, samples_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / name
    shutil.copyfile(samples_dir / "mlp.pt", path)
    doc = list_json(capsys, path)
    want = list_json(capsys, samples_dir / "mlp.pt")
    assert doc["format"] == "pt"
    assert doc["parameters"] == want["parameters"] and doc["totals"] == want["totals"]
    res = run(capsys, "freeze", path, "layers.0", "-q")
    assert res.returncode == 0, res.stderr
    loaded = torch.load(path, weights_only=True)
    assert isinstance(loaded["layers.0.weight"], nn.Parameter)
    assert not loaded["layers.0.weight"].requires_grad
    assert paramctl.frozen_names(path) == ["layers.0.weight", "layers.0.bias"]


def test_output_named_like_the_source_keeps_its_format(
        samples_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "model_best.pth.tar"
    shutil.copyfile(samples_dir / "mlp.pt", path)
    out = tmp_path / "frozen.pth.tar"
    res = run(capsys, "freeze", path, "layers.0", "-o", out, "-q")
    assert res.returncode == 0, res.stderr
    assert not torch.load(out, weights_only=True)["layers.0.bias"].requires_grad


def test_safetensors_without_extension(samples_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "weights"
    shutil.copyfile(samples_dir / "mlp.safetensors", path)
    doc = list_json(capsys, path)
    assert doc["format"] == "safetensors"
    assert doc["parameters"] == list_json(capsys, samples_dir / "mlp.safetensors")["parameters"]
    assert run(capsys, "freeze", path, "head", "-q").returncode == 0
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["paramctl.frozen"]) == ["head.bias", "head.weight"]


def test_upper_case_suffixes(samples_dir: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "MODEL.SAFETENSORS"
    shutil.copyfile(samples_dir / "mlp.safetensors", path)
    assert list_json(capsys, path)["format"] == "safetensors"


def test_legacy_torch_file_named_pth_tar(tmp_path: Path, cli: Callable[..., Any]) -> None:
    """The classic ImageNet-example ``model_best.pth.tar`` of old torch: recognised by its
    first bytes as a legacy torch file and listed torch-free (not "unknown type"), and
    by torch itself with --unsafe-load."""
    path = tmp_path / "model_best.pth.tar"
    torch.save({"state_dict": nn.Linear(3, 2).state_dict(), "epoch": 4}, path,
               _use_new_zipfile_serialization=False)
    res = cli("list", path, "-f", "names")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["weight", "bias"]
    res = cli("list", path, "--unsafe-load", "-f", "names")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["weight", "bias"]


@pytest.mark.parametrize("content", [
    os.urandom(4096), b"epoch: 3\nlr: 0.1\n", b"PK\x03\x04" + b"\0" * 60, b"{}",
], ids=["random-bytes", "text", "zip-magic-only", "tiny-json"])
def test_unrecognised_content_is_one_line(content: bytes, tmp_path: Path,
                                          cli: Callable[..., Any]) -> None:
    for name in ("x.pkl", "notes"):
        path = tmp_path / name
        path.write_bytes(content)
        res = cli("list", path)
        assert res.returncode == 1
        line = one_error_line(res)
        assert line.startswith(f"error: {path}: unknown checkpoint type"), line
        assert ".safetensors" in line


def test_torch_zip_with_data_pkl_not_first(samples_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Re-zipped by another tool (records reordered): found in the central directory."""
    with zipfile.ZipFile(samples_dir / "mlp.pt") as zf:
        records = [(i.filename, zf.read(i)) for i in zf.infolist()]
    path = tmp_path / "rezipped.ckpt.tar"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in sorted(records, key=lambda r: r[0].endswith("data.pkl")):
            zf.writestr(name, data)
    assert not zipfile.ZipFile(path).namelist()[0].endswith("data.pkl")
    doc = list_json(capsys, path)
    assert doc["format"] == "pt"
    assert doc["parameters"] == list_json(capsys, samples_dir / "mlp.pt")["parameters"]


def test_zip_without_data_pkl_is_not_taken_for_a_checkpoint(
        tmp_path: Path, cli: Callable[..., Any]) -> None:
    path = tmp_path / "bundle.tar"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/readme.txt", "hello")
    assert "unknown checkpoint type" in one_error_line(cli("list", path))


# =======================================================================================
# 2. Hugging Face save_pretrained folders with one weights file
# =======================================================================================
def _tiny(kind: str) -> Any:
    import transformers as tf

    torch.manual_seed(0)
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=2,
                                                vocab_size=100, n_positions=64))
    if kind == "bert":
        return tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, intermediate_size=64,
                                          vocab_size=100, max_position_embeddings=64))
    return tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2, vocab_size=100))


def _save_bin(model: Any, folder: Path, max_shard_size: str | None = None) -> None:
    """``pytorch_model.bin`` (or its shards and index) beside ``config.json``."""
    from huggingface_hub import save_torch_state_dict

    model.config.save_pretrained(folder)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    save_torch_state_dict(model.state_dict(), folder, safe_serialization=False, **kwargs)


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Read-only originals: per model kind a safetensors and a .bin save_pretrained folder,
    and a GPT-2 sharded .bin folder."""
    out = tmp_path_factory.mktemp("hf")
    made: dict[str, Any] = {"root": out}
    for kind in ("gpt2", "bert", "llama"):
        model = _tiny(kind)
        model.save_pretrained(out / f"{kind}-st")
        _save_bin(model, out / f"{kind}-bin")
        made[kind] = model
    _save_bin(made["gpt2"], out / "gpt2-sharded", max_shard_size="20KB")
    return made


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
@pytest.mark.parametrize("layout", ["st", "bin"])
def test_save_pretrained_folder_lists(hf: dict[str, Any], kind: str, layout: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    folder = hf["root"] / f"{kind}-{layout}"
    weights = folder / ("model.safetensors" if layout == "st" else "pytorch_model.bin")
    assert weights.is_file() and (folder / "config.json").is_file()
    doc = list_json(capsys, folder)
    assert doc["source"] == str(weights)
    assert doc["format"] == ("safetensors" if layout == "st" else "pt")
    stored = load_file(weights) if layout == "st" else torch.load(weights, weights_only=True)
    assert shapes(doc) == described(stored)
    state = hf[kind].state_dict()
    assert set(shapes(doc)) <= set(state)
    trainable = sum(p.numel() for n, p in hf[kind].named_parameters() if n in stored)
    assert doc["totals"]["trainable"] == trainable


def test_freeze_a_folder_rewrites_its_weights_file(hf: dict[str, Any], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    shutil.copytree(hf["root"] / "gpt2-st", folder)
    config = (folder / "config.json").read_bytes()
    res = run(capsys, "freeze", folder, "transformer.h.0", "-q")
    assert res.returncode == 0, res.stderr
    assert (folder / "config.json").read_bytes() == config
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        p.name for p in (hf["root"] / "gpt2-st").iterdir())
    frozen = paramctl.frozen_names(folder)
    assert frozen and all(n.startswith("transformer.h.0.") for n in frozen)
    model = GPT2LMHeadModel.from_pretrained(folder)
    paramctl.load_state_dict(model, folder)
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == set(frozen)


def test_folder_with_several_weights_files(samples_dir: Path, tmp_path: Path,
                                           cli: Callable[..., Any]) -> None:
    for name in ("a.safetensors", "b.safetensors"):
        shutil.copyfile(samples_dir / "mlp.safetensors", tmp_path / name)
    (tmp_path / "config.json").write_text("{}")
    res = cli("list", tmp_path)
    assert res.returncode == 1
    assert one_error_line(res) == (f"error: {tmp_path} holds several weights files; name "
                                   "one: a.safetensors, b.safetensors")


def test_trainer_checkpoint_folder_means_the_model(hf: dict[str, Any], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A Trainer ``checkpoint-N`` folder: the model beside optimizer and scheduler files."""
    folder = tmp_path / "checkpoint-500"
    shutil.copytree(hf["root"] / "llama-st", folder)
    model = hf["llama"]
    opt = torch.optim.AdamW(model.parameters())
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    torch.save({"step": 500}, folder / "rng_state.pth")
    doc = list_json(capsys, folder)
    assert doc["source"] == str(folder / "model.safetensors")


def test_empty_folder_is_one_line(tmp_path: Path, cli: Callable[..., Any]) -> None:
    (tmp_path / "config.json").write_text("{}")
    line = one_error_line(cli("list", tmp_path))
    assert "directory without a checkpoint" in line


# =======================================================================================
# 3. sharded .bin (pytorch_model.bin.index.json + pytorch_model-0000N-of-0000M.bin)
# =======================================================================================
BIN_INDEX = "pytorch_model.bin.index.json"


@pytest.fixture
def sharded(hf: dict[str, Any], tmp_path: Path) -> Path:
    folder = tmp_path / "gpt2-sharded"
    shutil.copytree(hf["root"] / "gpt2-sharded", folder)
    return folder


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("pytorch_model-*.bin"))


def test_sharded_bin_lists_what_the_shards_hold(sharded: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    shards = _shards(sharded)
    assert len(shards) > 2
    merged: dict[str, torch.Tensor] = {}
    for shard in shards:
        merged.update(torch.load(shard, weights_only=True))
    for spec in (sharded, sharded / BIN_INDEX):
        doc = list_json(capsys, spec)
        assert doc["format"] == "pt-sharded"
        assert shapes(doc) == described(merged)
        index = json.loads((sharded / BIN_INDEX).read_text())
        assert [p["name"] for p in doc["parameters"]] == list(index["weight_map"])
    tied = {p["name"]: p["tied"] for p in doc["parameters"] if p["tied"]}
    assert tied == {"lm_head.weight": ["transformer.wte.weight"],
                    "transformer.wte.weight": ["lm_head.weight"]}


def test_sharded_bin_freeze_rewrites_only_the_index(
        sharded: Path, hf: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import GPT2LMHeadModel

    before = folder_state(sharded)
    res = run(capsys, "freeze", sharded, "transformer.h.0", "-q")
    assert res.returncode == 0, res.stderr
    after = folder_state(sharded)
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {BIN_INDEX}  # every shard byte-identical, mtimes too
    want = {n for n, _ in hf["gpt2"].named_parameters() if n.startswith("transformer.h.0.")}
    index = json.loads((sharded / BIN_INDEX).read_text())
    assert set(index["metadata"]["paramctl.frozen"]) == want
    assert index["metadata"]["total_size"] > 0  # what was there is kept
    assert set(paramctl.frozen_names(sharded)) == want
    res = run(capsys, "list", sharded, "--frozen", "-f", "names")
    assert set(res.stdout.split()) == want
    model = GPT2LMHeadModel.from_pretrained(sharded)  # transformers still loads it
    for name, tensor in hf["gpt2"].state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert paramctl.load_state_dict(model, sharded) == ([], [])
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == want
    res = run(capsys, "unfreeze", sharded, "*", "-q")
    assert res.returncode == 0 and paramctl.frozen_names(sharded) == []
    assert {n: s for n, s in folder_state(sharded).items() if n != BIN_INDEX} == {
        n: s for n, s in before.items() if n != BIN_INDEX}


def test_sharded_bin_init_rewrites_only_touched_shards(
        sharded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    index = json.loads((sharded / BIN_INDEX).read_text())
    target = "transformer.h.1.mlp.c_fc.weight"
    shard = index["weight_map"][target]
    before = folder_state(sharded)
    originals = {s.name: torch.load(s, weights_only=True) for s in _shards(sharded)}
    res = run(capsys, "init", sharded, f"{target}=zeros", "--seed", "0", "-q")
    assert res.returncode == 0, res.stderr
    after = folder_state(sharded)
    assert {n for n in before if before[n] != after[n]} == {shard}
    for s in _shards(sharded):
        loaded = torch.load(s, weights_only=True, mmap=True)
        for name, tensor in originals[s.name].items():
            if name == target:
                assert not loaded[name].any()
            else:
                assert torch.equal(loaded[name], tensor), name


def test_sharded_bin_merges_to_one_safetensors(sharded: Path, hf: dict[str, Any],
                                               tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "merged.safetensors"
    res = run(capsys, "freeze", sharded, "transformer.h.1", "-o", out, "-q")
    assert res.returncode == 0, res.stderr
    merged = load_file(out)
    state = hf["gpt2"].state_dict()
    assert set(merged) == set(state)
    for name, tensor in state.items():
        assert torch.equal(merged[name], tensor), name
    frozen = set(paramctl.frozen_names(out))
    assert frozen and all(n.startswith("transformer.h.1.") for n in frozen)


def test_sharded_bin_copy_to_new_folder(sharded: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "copy"
    res = run(capsys, "init", sharded, "lm_head.weight=zeros", "--seed", "0", "-o", out,
              "-q")
    assert res.returncode == 0, res.stderr
    assert list_json(capsys, out)["format"] == "pt-sharded"
    loaded = torch.load(out / json.loads((out / BIN_INDEX).read_text())["weight_map"][
        "lm_head.weight"], weights_only=True)
    assert not loaded["lm_head.weight"].any()
    assert not loaded["transformer.wte.weight"].any()  # tied: one storage


def test_sharded_bin_missing_shard(sharded: Path, cli: Callable[..., Any]) -> None:
    _shards(sharded)[1].unlink()
    line = one_error_line(cli("list", sharded))
    assert "is missing" in line


def test_safetensors_index_wins_over_bin_index(hf: dict[str, Any], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Hub repos often ship both layouts; like from_pretrained, take the safetensors."""
    folder = tmp_path / "both"
    shutil.copytree(hf["root"] / "gpt2-sharded", folder)
    hf["gpt2"].save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert list_json(capsys, folder)["format"] == "safetensors-sharded"
    assert list_json(capsys, folder / BIN_INDEX)["format"] == "pt-sharded"


# =======================================================================================
# 4. PEFT adapter folders
# =======================================================================================
@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    out = tmp_path_factory.mktemp("peft")
    base = _tiny("llama")
    with warnings.catch_warnings():  # transformers' own deprecation notices
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16,
                                                target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(out / "adapter")
    model.save_pretrained(out / "adapter-bin", safe_serialization=False)
    return {"root": out, "model": model}


ADAPTER = {"peft_type": "LORA", "base_model_name_or_path": None, "r": 8, "lora_alpha": 16,
           "target_modules": ["q_proj", "v_proj"]}


@pytest.mark.parametrize(("folder", "weights"), [
    ("adapter", "adapter_model.safetensors"), ("adapter-bin", "adapter_model.bin")])
def test_peft_adapter_lists_with_its_config(adapter: dict[str, Any], folder: str,
                                            weights: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = adapter["root"] / folder
    doc = list_json(capsys, path)
    assert doc["source"] == str(path / weights)
    assert doc["adapter"] == ADAPTER
    assert list(doc)[:4] == ["source", "format", "parameters", "totals"]
    # the names PEFT stores (adapter name dropped) with the shapes of the LoRA matrices
    lora = {n.replace(".default", ""): (tuple(p.shape), "float32")
            for n, p in adapter["model"].named_parameters() if "lora_" in n}
    assert shapes(doc) == lora
    assert all(p["requires_grad"] for p in doc["parameters"])
    assert {s for s, _ in lora.values()} == {(8, 32), (32, 8), (16, 8)}


def test_peft_adapter_table_footer(adapter: dict[str, Any],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    res = run(capsys, "list", adapter["root"] / "adapter", "-f", "table", "--width", "120")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[-1] == "LoRA adapter: r=8, lora_alpha=16, target_modules=q_proj, v_proj"
    # named directly, the weights file says the same
    res = run(capsys, "list", adapter["root"] / "adapter" / "adapter_model.safetensors",
              "-f", "table", "--width", "120")
    assert res.stdout.splitlines()[-1] == lines[-1]


def test_other_sources_have_no_adapter_key(samples_dir: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert "adapter" not in list_json(capsys, samples_dir / "mlp.safetensors")


@pytest.mark.parametrize(("config", "needle"), [
    (b"{not json", "not a valid adapter config"),
    (b"[1, 2]", "a JSON object expected"),
    (b'{"r": "eight"}', "'r' is str"),
    (b'{"target_modules": [1, 2]}', "'target_modules'"),
    (b"\xff\xfe", "not a valid adapter config"),
    (b'{"r": 8, "pad": "' + b"x" * (2 << 20) + b'"}', "byte limit"),
])
def test_malformed_adapter_config_is_one_line(adapter: dict[str, Any], tmp_path: Path,
                                              cli: Callable[..., Any], config: bytes,
                                              needle: str) -> None:
    folder = tmp_path / "adapter"
    shutil.copytree(adapter["root"] / "adapter", folder)
    (folder / "adapter_config.json").write_bytes(config)
    res = cli("list", folder, "-f", "json")
    assert res.returncode == 1
    line = one_error_line(res)
    assert line.startswith(f"error: {folder / 'adapter_config.json'}: ") and needle in line


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' own deprecations
def test_frozen_adapter_still_loads_in_peft(adapter: dict[str, Any], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from peft import PeftModel

    folder = tmp_path / "adapter"
    shutil.copytree(adapter["root"] / "adapter", folder)
    res = run(capsys, "freeze", folder, "*.lora_A.*", "-q")
    assert res.returncode == 0, res.stderr
    assert all(".lora_A." in n for n in paramctl.frozen_names(folder))
    PeftModel.from_pretrained(_tiny("llama"), folder)


# =======================================================================================
# 5. buffers recognised by name in files
# =======================================================================================
class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)


@pytest.fixture(scope="module")
def bn_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[BNNet, dict[str, Path]]:
    out = tmp_path_factory.mktemp("bn")
    torch.manual_seed(0)
    model = BNNet()
    model.bn.running_mean.uniform_()
    state = model.state_dict()  # plain tensors: no keep_vars
    torch.save(state, out / "bn.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, out / "bn.safetensors")
    return model, {"pt": out / "bn.pt", "safetensors": out / "bn.safetensors"}


BN_BUFFERS = {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_batchnorm_statistics_are_buffers(bn_files: tuple[BNNet, dict[str, Path]], fmt: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    model, files = bn_files
    doc = list_json(capsys, files[fmt])
    buffers = {p["name"] for p in doc["parameters"] if p["buffer"]}
    assert buffers == BN_BUFFERS
    assert not any(p["requires_grad"] for p in doc["parameters"] if p["buffer"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert doc["totals"]["trainable"] == trainable
    assert doc["totals"]["frozen"] == 0
    res = run(capsys, "list", files[fmt], "-f", "table", "--width", "100")
    assert f"trainable {trainable:,} (" in res.stdout


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_freeze_everything_skips_buffers_and_says_so(
        bn_files: tuple[BNNet, dict[str, Path]], fmt: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    model, files = bn_files
    path = tmp_path / files[fmt].name
    shutil.copyfile(files[fmt], path)
    res = run(capsys, "freeze", path, "*", "-f", "json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert set(doc["skipped"]) == BN_BUFFERS
    assert {c["name"] for c in doc["changes"]} == {n for n, _ in model.named_parameters()}
    frozen = run(capsys, "list", path, "--frozen", "-f", "names").stdout.split()
    assert set(frozen) == {n for n, _ in model.named_parameters()}
    shutil.copyfile(files[fmt], path)
    res = run(capsys, "freeze", path, "bn", "-f", "table")
    assert "3 skipped (buffers" in res.stdout


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_init_of_a_file_buffer_is_refused(bn_files: tuple[BNNet, dict[str, Path]], fmt: str,
                                          cli: Callable[..., Any]) -> None:
    _, files = bn_files
    line = one_error_line(cli("init", files[fmt], "bn.running_var=ones", "--dry-run"))
    assert line.startswith("error: cannot initialise buffer bn.running_var (float32)")


def test_buffers_in_sharded_and_dcp_files(bn_files: tuple[BNNet, dict[str, Path]],
                                          tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    import torch.distributed.checkpoint as dcp
    from huggingface_hub import save_torch_state_dict

    model, _ = bn_files
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for folder in ("bin", "st"):
        (tmp_path / folder).mkdir()
    save_torch_state_dict(state, tmp_path / "bin", safe_serialization=False,
                          max_shard_size=200)
    save_torch_state_dict(state, tmp_path / "st", max_shard_size=200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)  # type: ignore[attr-defined]
    for folder, fmt in (("bin", "pt-sharded"), ("st", "safetensors-sharded"), ("dcp", "dcp")):
        doc = list_json(capsys, tmp_path / folder)
        assert doc["format"] == fmt
        assert {p["name"] for p in doc["parameters"] if p["buffer"]} == BN_BUFFERS, fmt


LEARNED = """
import torch
from torch import nn


class Learned(nn.Module):
    \"\"\"A model whose rotary frequencies are learned: a Parameter named inv_freq.\"\"\"

    def __init__(self) -> None:
        super().__init__()
        self.rope = nn.Module()
        self.rope.inv_freq = nn.Parameter(torch.ones(4))
        self.proj = nn.Linear(4, 4)
"""


def test_module_path_stays_the_authority(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The file alone goes by names; a module path, with or without --weights, knows that
    this inv_freq is a parameter."""
    (tmp_path / "learned.py").write_text(LEARNED)
    spec = f"{tmp_path / 'learned.py'}:Learned"
    ckpt = tmp_path / "learned.pt"
    torch.save({"rope.inv_freq": torch.ones(4), "proj.weight": torch.zeros(4, 4),
                "proj.bias": torch.zeros(4)}, ckpt)
    in_file = {p["name"]: p for p in list_json(capsys, ckpt)["parameters"]}
    assert in_file["rope.inv_freq"]["buffer"] and not in_file["rope.inv_freq"]["requires_grad"]
    for extra in ((), ("--weights", ckpt)):
        doc = list_json(capsys, spec, *extra)
        params = {p["name"]: p for p in doc["parameters"]}
        assert not params["rope.inv_freq"]["buffer"], extra
        assert params["rope.inv_freq"]["requires_grad"], extra
        assert doc["totals"]["trainable"] == 24


def test_buffer_names_compose_with_what_a_reader_knows() -> None:
    """A reader that already knows a tensor is a buffer (a Parameter file's plain tensors)
    keeps it one; names outside the list stay parameters; ``bias`` is never guessed."""
    infos = [ParamInfo("enc.pos", (4,), "float32", 4, 16, False, buffer=True),
             ParamInfo("rope.inv_freq", (4,), "float32", 4, 16, True),
             ParamInfo("attn.bias", (4,), "float32", 4, 16, True),
             ParamInfo("embeddings.position_ids", (1, 4), "int64", 4, 32, False)]
    marked = mark_buffers(infos)
    assert [p.buffer for p in marked] == [True, True, False, True]
    assert not marked[1].requires_grad and marked[2].requires_grad
    assert "bias" not in BUFFER_NAMES and "weight" not in BUFFER_NAMES


# =======================================================================================
# 6. a damaged zip that claims encryption
# =======================================================================================
def _flag_offsets(path: Path, record: str) -> tuple[int, int]:
    """(central directory flags offset, local header flags offset) of ``record``."""
    data = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(record))
    name = info.filename.encode()
    central = data.index(b"PK\x01\x02")
    while data[central + 46:central + 46 + len(name)] != name:
        central = data.index(b"PK\x01\x02", central + 4)
    return central + 8, info.header_offset + 6


@pytest.mark.parametrize("where", ["central", "local"])
def test_encryption_flag_means_a_corrupt_file(samples_dir: Path, tmp_path: Path,
                                              cli: Callable[..., Any], where: str) -> None:
    path = tmp_path / "mlp.pt"
    shutil.copyfile(samples_dir / "mlp.pt", path)
    central, local = _flag_offsets(path, "/data.pkl")
    data = bytearray(path.read_bytes())
    at = central if where == "central" else local
    (flags,) = struct.unpack_from("<H", data, at)
    struct.pack_into("<H", data, at, flags | 0x1)
    path.write_bytes(bytes(data))
    prefix = zipfile.ZipFile(samples_dir / "mlp.pt").namelist()[0].split("/")[0]
    assert one_error_line(cli("list", path)) == (
        f"error: {path}: record '{prefix}/data.pkl' has the encryption flag set: the file "
        "is corrupt (torch never encrypts records)")
