"""paramctl convert on real checkpoints, loaded afterwards by the consumer that matters."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import folder_state, one_error_line, run_cli, sha
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 8))
        self.head = nn.Linear(8, 3)


@pytest.fixture
def ddp_ckpt(tmp_path: Path) -> tuple[Path, Net, dict]:
    """A DDP-prefixed training checkpoint with optimizer state, epoch and a frozen layer."""
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.AdamW(net.parameters())
    net.head(net.encoder(torch.randn(5, 4))).sum().backward()
    opt.step()
    state = {"module." + k: v for k, v in net.state_dict(keep_vars=True).items()}
    state["module.head.weight"] = nn.Parameter(net.head.weight.detach(), requires_grad=False)
    ckpt = {"model": state, "optimizer": opt.state_dict(), "epoch": 7}
    path = tmp_path / "ddp.pt"
    torch.save(ckpt, path)
    return path, net, opt.state_dict()


def test_strip_ddp_prefix_keeps_everything_else(ddp_ckpt: tuple[Path, Net, dict],
                                                tmp_path: Path) -> None:
    path, net, opt_state = ddp_ckpt
    out = tmp_path / "plain.pt"
    res = run_cli("convert", path, "--rename", "module.=", "-o", out, "-q")
    assert res.returncode == 0, res.stderr
    ck = torch.load(out, weights_only=True)
    assert ck["epoch"] == 7
    fresh = Net()
    fresh.load_state_dict(ck["model"], strict=True)
    for (name, p), q in zip(net.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert ck["optimizer"]["param_groups"] == opt_state["param_groups"]
    for k, v in opt_state["state"].items():
        assert torch.equal(ck["optimizer"]["state"][k]["exp_avg"], v["exp_avg"])
    # the frozen flag followed its new name
    frozen = json.loads(run_cli("list", out, "--frozen", "-f", "json", "--key", "model").stdout)
    assert [p["name"] for p in frozen["parameters"]] == ["head.weight"]
    # tensor records are byte-identical (only data.pkl changed)
    with zipfile.ZipFile(path) as za, zipfile.ZipFile(out) as zb:
        data_a = {n.split("/", 1)[1]: za.read(n) for n in za.namelist() if "/data/" in n}
        data_b = {n.split("/", 1)[1]: zb.read(n) for n in zb.namelist() if "/data/" in n}
    assert data_a == data_b


def test_drop_and_keep_in_a_training_checkpoint(ddp_ckpt: tuple[Path, Net, dict],
                                                tmp_path: Path) -> None:
    path, _, _ = ddp_ckpt
    out = tmp_path / "nohead.pt"
    assert run_cli("convert", path, "--drop", "module.head", "-o", out).returncode == 0
    ck = torch.load(out, weights_only=True)
    assert not any(k.startswith("module.head") for k in ck["model"])
    assert ck["epoch"] == 7
    with zipfile.ZipFile(path) as za, zipfile.ZipFile(out) as zb:
        assert len(zb.namelist()) == len(za.namelist()) - 2  # head weight and bias records


def test_in_place_rename_and_dry_run(ddp_ckpt: tuple[Path, Net, dict]) -> None:
    path, _, _ = ddp_ckpt
    before = sha(path)
    dry = run_cli("convert", path, "--rename", "module.encoder.=module.backbone.", "--dry-run",
                  "-f", "json")
    assert dry.returncode == 0 and sha(path) == before
    doc = json.loads(dry.stdout)
    assert doc["dry_run"] is True
    assert {t["new_name"] for t in doc["tensors"]} >= {"module.backbone.0.weight"}
    assert run_cli("convert", path, "--rename", "module.encoder.=module.backbone.",
                   "-q").returncode == 0
    names = json.loads(run_cli("list", path, "--key", "model", "-f", "json").stdout)
    assert "module.backbone.0.weight" in {p["name"] for p in names["parameters"]}


def test_errors_leave_the_original(ddp_ckpt: tuple[Path, Net, dict]) -> None:
    path, _, _ = ddp_ckpt
    before = sha(path)
    nomatch = run_cli("convert", path, "--rename", "decoder.=x")
    assert nomatch.returncode == 3 and "matched no name" in one_error_line(nomatch)
    clash = run_cli("convert", path, "--rename", r"re:^module\.encoder\.0\.(weight|bias)$=x")
    assert clash.returncode == 1
    assert "'module.encoder.0.weight' and 'module.encoder.0.bias'" in one_error_line(clash)
    bad = run_cli("convert", path, "--cast", "int4")
    assert bad.returncode == 2 and "float32, bfloat16, float16" in one_error_line(bad)
    assert sha(path) == before


def test_transformers_extract_encoder_and_from_pretrained(tmp_path: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=3)
    torch.manual_seed(0)
    full = BertForSequenceClassification(cfg)
    src = tmp_path / "cls"
    full.save_pretrained(src)
    enc = tmp_path / "enc"
    enc.mkdir()
    shutil.copy(src / "config.json", enc / "config.json")
    res = run_cli("convert", src / "model.safetensors", "--keep", "bert", "--rename", "bert.=",
                  "-o", enc / "model.safetensors")
    assert res.returncode == 0, res.stderr
    with safe_open(enc / "model.safetensors", "pt") as f:
        assert f.metadata().get("format") == "pt"
    model = BertModel.from_pretrained(enc)
    for name, t in model.state_dict().items():
        if name in full.bert.state_dict():
            assert torch.equal(t, full.bert.state_dict()[name]), name


@pytest.fixture
def mixed_st(tmp_path: Path) -> Path:
    torch.manual_seed(4)
    t = {"layer.weight": torch.randn(64, 32), "norm.weight": torch.randn(32) * 3,
         "emb.weight": torch.randn(16, 8).to(torch.bfloat16), "step": torch.tensor([3]),
         "big.weight": torch.tensor([1e5, -7e4, 1.0])}
    t["layer.weight"][0, :4] = torch.tensor([float("nan"), float("inf"), 1e-40, -0.0])
    path = tmp_path / "mixed.safetensors"
    save_file(t, path, metadata={"note": "keep me"})
    return path


def test_cast_bf16_is_bit_exact_keeps_norms_and_ints(mixed_st: Path, tmp_path: Path) -> None:
    out = tmp_path / "bf16.safetensors"
    res = run_cli("convert", mixed_st, "--cast", "bfloat16", "--no-cast", "*norm*", "-o", out)
    assert res.returncode == 0, res.stderr
    src, got = load_file(mixed_st), load_file(out)
    assert got["norm.weight"].dtype == torch.float32
    assert torch.equal(got["norm.weight"], src["norm.weight"])
    assert got["step"].dtype == torch.int64
    for name in ("layer.weight", "big.weight", "emb.weight"):
        want = src[name].to(torch.bfloat16)
        assert got[name].dtype == torch.bfloat16
        assert torch.equal(got[name].view(torch.int16), want.view(torch.int16)), name
    with safe_open(out, "pt") as f:
        assert f.metadata()["note"] == "keep me"


def test_float16_overflow_names_the_tensor(mixed_st: Path, tmp_path: Path) -> None:
    out = tmp_path / "half.safetensors"
    res = run_cli("convert", mixed_st, "--cast", "float16", "-o", out)
    assert res.returncode == 1
    assert "big.weight" in one_error_line(res) and "--allow-overflow" in res.stderr
    assert not out.exists()
    ok = run_cli("convert", mixed_st, "--cast", "float16", "--allow-overflow", "-o", out)
    assert ok.returncode == 0, ok.stderr
    got = load_file(out)["big.weight"]
    assert torch.equal(got.view(torch.int16),
                       load_file(mixed_st)["big.weight"].half().view(torch.int16))


def test_cast_in_place_plain_pt(tmp_path: Path) -> None:
    torch.manual_seed(5)
    sd = {"a": torch.randn(10, 10), "b": torch.arange(4)}
    path = tmp_path / "plain.pt"
    torch.save(sd, path)
    assert run_cli("convert", path, "--cast", "bf16", "-q").returncode == 0
    got = torch.load(path, weights_only=True)
    assert got["a"].dtype == torch.bfloat16 and torch.equal(got["a"], sd["a"].bfloat16())
    assert torch.equal(got["b"], sd["b"])


def test_dcp_to_safetensors_and_shards(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(6)
    state = {"model.w": torch.randn(32, 16), "model.b": torch.randn(16),
             "model.e": torch.randn(8, 4).bfloat16()}
    folder = tmp_path / "dcp"
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    out = tmp_path / "one.safetensors"
    res = run_cli("convert", folder, "-o", out, "--rename", "model.=")
    assert res.returncode == 0, res.stderr
    got = load_file(out)
    assert set(got) == {"w", "b", "e"}
    for k, v in state.items():
        assert torch.equal(got[k.removeprefix("model.")], v)
    shards = tmp_path / "shards"
    res = run_cli("convert", folder, "-o", shards, "--max-shard-size", "1KB")
    assert res.returncode == 0, res.stderr
    index = json.loads((shards / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state)
    assert len(set(index["weight_map"].values())) >= 2


def test_apply_rules_file_with_convert_steps(ddp_ckpt: tuple[Path, Net, dict],
                                             tmp_path: Path) -> None:
    path, _, _ = ddp_ckpt
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nfreeze = ["module.encoder.0"]\n'
                     '[[rule]]\nrename = ["module.="]\n'
                     '[[rule]]\ndrop = "module.head.bias"\n')
    out = tmp_path / "applied.pt"
    res = run_cli("apply", path, rules, "-o", out)
    assert res.returncode == 0, res.stderr
    doc = json.loads(run_cli("list", out, "--key", "model", "-f", "json").stdout)
    by = {p["name"]: p for p in doc["parameters"]}
    assert "head.bias" not in by and "encoder.0.weight" in by
    assert by["encoder.0.weight"]["requires_grad"] is False
    assert by["head.weight"]["requires_grad"] is False  # was frozen before, still is


@pytest.fixture
def sharded_llama(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A transformers Llama saved in 6 safetensors shards (tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=500, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=True)
    torch.manual_seed(8)
    model = LlamaForCausalLM(cfg)
    folder = tmp_path / "llama"
    model.save_pretrained(folder, max_shard_size="40KB")
    assert len(list(folder.glob("model-*.safetensors"))) >= 3
    return folder, {k: v.clone() for k, v in model.state_dict().items()}


def _load_bf16(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).state_dict()


def test_sharded_cast_to_a_new_folder_keeps_the_shards(
        sharded_llama: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    src, state = sharded_llama
    out = tmp_path / "bf16"
    res = run_cli("convert", src, "--cast", "bf16", "-o", out)
    assert res.returncode == 0, res.stderr
    old = json.loads((src / "model.safetensors.index.json").read_text())
    new = json.loads((out / "model.safetensors.index.json").read_text())
    assert new["weight_map"] == old["weight_map"]  # every tensor in the shard it was in
    for shard in set(new["weight_map"].values()):
        with safe_open(out / shard, "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118
    assert new["metadata"]["total_size"] == old["metadata"]["total_size"] // 2
    for f in ("config.json", "generation_config.json"):
        shutil.copy(src / f, out / f)
    for name, t in _load_bf16(out).items():
        assert torch.equal(t, state[name].to(torch.bfloat16)), name


def test_sharded_cast_in_place(sharded_llama: tuple[Path, dict[str, torch.Tensor]]) -> None:
    src, state = sharded_llama
    before = json.loads((src / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in src.glob("model-*.safetensors"))
    res = run_cli("convert", src, "--cast", "bfloat16", "--no-cast", "*norm*", "-q")
    assert res.returncode == 0, res.stderr
    after = json.loads((src / "model.safetensors.index.json").read_text())
    assert after["weight_map"] == before["weight_map"]
    assert sorted(p.name for p in src.glob("model-*.safetensors")) == shards
    assert not [p for p in src.iterdir() if ".paramctl-" in p.name]
    for name, t in _load_bf16(src).items():
        assert torch.equal(t, state[name].to(torch.bfloat16)), name
    listed = json.loads(run_cli("list", src, "-f", "json").stdout)["parameters"]
    dtypes = {p["name"]: p["dtype"] for p in listed}
    assert {d for n, d in dtypes.items() if "norm" in n} == {"float32"}
    assert {d for n, d in dtypes.items() if "norm" not in n} == {"bfloat16"}


def test_sharded_rename_keep_and_refusals(
        sharded_llama: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    src, state = sharded_llama
    stamp = folder_state(src)
    # Renaming in place would move names across files non-atomically: refused, untouched.
    res = run_cli("convert", src, "--rename", "model.=backbone.")
    assert res.returncode == 2
    assert "-o NEW_FOLDER" in one_error_line(res)
    assert folder_state(src) == stamp
    out = tmp_path / "renamed"
    res = run_cli("convert", src, "--rename", "model.=backbone.", "-o", out, "-q")
    assert res.returncode == 0, res.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    stored = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    assert list(index["weight_map"]) == ["backbone." + k.removeprefix("model.")
                                         if k.startswith("model.") else k for k in stored]
    for name, shard in index["weight_map"].items():
        assert name in load_file(out / shard)
    # Keeping one layer empties some shards: the rest are numbered afresh.
    kept = tmp_path / "layer0"
    res = run_cli("convert", src, "--keep", "model.layers.0.*", "-o", kept, "-q")
    assert res.returncode == 0, res.stderr
    index = json.loads((kept / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in kept.glob("*.safetensors")) == files
    got = {k: v for f in files for k, v in load_file(kept / f).items()}
    assert set(got) == {k for k in state if k.startswith("model.layers.0.")}
    for k, v in got.items():
        assert torch.equal(v, state[k]), k
    assert folder_state(src) == stamp


def test_sharded_bin_converts_to_safetensors_shards(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(2)
    model = BertModel(cfg)
    src = tmp_path / "bin"
    model.save_pretrained(src)  # for its config; the shards are written as transformers 4 did
    (src / "model.safetensors").unlink()
    names = list(model.state_dict())
    thirds = [names[i::3] for i in range(3)]
    weight_map = {}
    for i, part in enumerate(thirds, start=1):
        shard = f"pytorch_model-{i:05d}-of-00003.bin"
        torch.save({k: model.state_dict()[k] for k in part}, src / shard)
        weight_map.update(dict.fromkeys(part, shard))
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    out = tmp_path / "st"
    res = run_cli("convert", src, "-o", out, "-q")
    assert res.returncode == 0, res.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert all(f.endswith(".safetensors") for f in files) and len(files) >= 2
    shutil.copy(src / "config.json", out / "config.json")
    again = BertModel.from_pretrained(out)
    for name, t in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name
    res = run_cli("convert", src, "--cast", "bf16")  # in place: .bin shards cannot stay
    assert res.returncode == 2 and "-o NEW_FOLDER" in one_error_line(res)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_streamed_cast_of_many_tensors_in_small_pieces(tmp_path: Path, dtype: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Many tensors of many pieces each, read ahead, cast and written on three threads:
    every byte equals tensor.to() (buffers reused across tensors must never be
    overwritten while the writer still holds them)."""
    from paramctl import surgery
    from paramctl.surgery import ConvertPlan, convert

    monkeypatch.setattr(surgery, "_CAST_STEP", 4096)
    g = torch.Generator().manual_seed(11)
    state = {f"t{i:02d}": (torch.randn(1 + 37 * i, 33, generator=g) * 10).bfloat16()
             for i in range(40)}
    src = tmp_path / "m.safetensors"
    save_file(state, str(src))
    out = tmp_path / "cast.safetensors"
    convert(str(src), ConvertPlan.parse(cast=dtype), out=out)
    got = load_file(out)
    for name, t in state.items():
        want = t.to(getattr(torch, dtype))
        assert torch.equal(got[name].view(torch.uint8), want.view(torch.uint8)), name
