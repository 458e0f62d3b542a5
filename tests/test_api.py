"""The Python API on in-memory modules and real files: freeze, unfreeze, init_params,
apply_rules, load_state_dict and frozen_names."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import run_inproc as run
from safetensors.torch import load_file
from torch import nn

import paramctl
from paramctl.errors import NoMatchError, ParamctlError, UsageError
from sample_models.cnn import SmallCNN
from sample_models.mlp import MLP
from sample_models.transformer import TinyTransformer


def frozen(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def raw(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def file_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return dict(load_file(str(path)))
    return dict(torch.load(path, weights_only=True))


# -- freeze / unfreeze -----------------------------------------------------------------------
def test_freeze_and_unfreeze_in_memory() -> None:
    model = TinyTransformer()
    changed = paramctl.freeze(model, ["blocks.0", "norm"], excludes=["*.bias"])
    want = {n for n, _ in model.named_parameters() if (n.startswith("blocks.0.")
            or n.startswith("norm.")) and not n.endswith(".bias")}
    assert set(changed) == want == frozen(model)
    assert paramctl.freeze(model, ["blocks.0", "norm"], excludes=["*.bias"]) == []  # no-op
    assert set(paramctl.unfreeze(model, "blocks.0.attn")) == {
        n for n in want if n.startswith("blocks.0.attn.")}
    assert frozen(model) == {n for n in want if not n.startswith("blocks.0.attn.")}
    assert paramctl.freeze(model, ["re:^blocks\\.1\\..*fc2", "!*.weight"]) == \
        ["blocks.1.mlp.fc2.bias"]
    # freezing changes flags only, never values
    ref = TinyTransformer()
    ref.load_state_dict(model.state_dict())
    paramctl.freeze(model, "*")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 ref.state_dict().values(), strict=True))
    assert not any(p.requires_grad for p in model.parameters())
    assert len(paramctl.unfreeze(model, "*")) == len(list(model.parameters()))


def test_freeze_tied_and_errors() -> None:
    model = TinyTransformer()
    paramctl.freeze(model, "lm_head")
    assert not model.embed.weight.requires_grad and model.lm_head.weight is model.embed.weight
    with pytest.raises(NoMatchError) as info:
        paramctl.freeze(model, ["blocks.7"])
    assert info.value.exit_code == 3 and "blocks.7" in str(info.value)
    # an exclude that matches nothing is fine (lm_head.weight is embed.weight: one change)
    assert paramctl.unfreeze(model, "*", excludes=["nothing"]) == ["embed.weight"]
    assert paramctl.freeze(model, ["blocks.7"], allow_empty=True) == []
    with pytest.raises(UsageError):
        paramctl.freeze(model, ["re:("])


def test_buffers_and_int_tensors_untouched() -> None:
    model = SmallCNN()
    paramctl.freeze(model, "features")
    assert frozen(model) == {n for n, _ in model.named_parameters() if n.startswith("features.")}
    assert model.classifier.weight.requires_grad
    assert model.features[1].num_batches_tracked.dtype == torch.int64


# -- init_params -----------------------------------------------------------------------------
def test_init_params_values_and_seed() -> None:
    torch.manual_seed(0)
    model = MLP(in_features=256, hidden=512)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng_state = torch.random.get_rng_state()
    done = paramctl.init_params(model, ["*.bias=zeros", "layers.1.weight=normal(std=0.05)",
                                        "head.weight=kaiming_uniform(nonlinearity=relu)"],
                                seed=3)
    rng_after = torch.random.get_rng_state()
    assert set(done) == {"layers.0.bias", "layers.1.bias", "head.bias", "layers.1.weight",
                         "head.weight"}
    assert all(torch.count_nonzero(m.bias) == 0 for m in (*model.layers, model.head))
    assert torch.equal(model.layers[0].weight, before["layers.0.weight"])
    assert abs(model.layers[1].weight.std().item() - 0.05) < 0.0015
    bound = math.sqrt(6 / 512)
    assert model.head.weight.abs().max().item() <= bound
    assert all(p.requires_grad for p in model.parameters())
    assert model.layers[1].weight.grad is None

    again = MLP(in_features=256, hidden=512)
    paramctl.init_params(again, ["layers.1.weight=normal(std=0.05)"], seed=3)
    assert torch.equal(again.layers[1].weight, model.layers[1].weight)
    other = MLP(in_features=256, hidden=512)
    paramctl.init_params(other, ["layers.1.weight=normal(std=0.05)"], seed=4)
    assert not torch.equal(other.layers[1].weight, model.layers[1].weight)
    # a seeded init leaves the caller's global RNG where it was
    assert torch.equal(rng_after, rng_state)


def test_init_params_last_rule_wins_and_errors() -> None:
    model = MLP()
    paramctl.init_params(model, ["*=zeros", "head.bias=ones"], seed=0)
    assert torch.equal(model.head.bias, torch.ones(4))
    assert torch.equal(model.head.weight, torch.zeros(4, 32))
    with pytest.raises(UsageError) as info:
        paramctl.init_params(model, ["*=zeroes"])
    assert "zeros" in str(info.value) and info.value.exit_code == 2
    with pytest.raises(UsageError):
        paramctl.init_params(model, ["*=normal(sigma=1)"])
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ParamctlError) as err:
        paramctl.init_params(model, ["*.bias=xavier_uniform"], seed=0)
    assert "bias" in str(err.value) and err.value.exit_code == 1
    assert all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize(("name", "rules"), [
    ("mlp.pt", ["layers.*.weight=kaiming_normal(mode=fan_out)", "*.bias=uniform(a=-2, b=2)"]),
    ("llama.safetensors", ["*proj.weight=trunc_normal(std=0.02)", "*norm*=constant(val=0.5)"]),
    ("transformer.pt", ["*=normal(std=0.1)"]),
    ("transformer.pt", ["lm_head=normal(std=0.1)"]),
])
def test_init_params_matches_cli_on_a_file(sample: Callable[[str], Path],
                                           capsys: pytest.CaptureFixture[str], name: str,
                                           rules: list[str]) -> None:
    """The same rules and seed give the same tensors in memory and in a checkpoint."""
    from sample_models.llama import Llama

    path = sample(name)
    res = run(capsys, "init", path, *rules, "--seed", "17")
    assert res.returncode == 0, res.stderr
    model = {"mlp": MLP, "llama": Llama, "transformer": TinyTransformer}[name.split(".")[0]]()
    paramctl.init_params(model, rules, seed=17)
    on_disk = file_tensors(path)
    touched = {line.split("\t")[0] for line in res.stdout.splitlines()}
    state = model.state_dict()
    for n in touched:
        if n in state:
            assert raw(state[n]) == raw(on_disk[n]), n


# -- apply_rules -----------------------------------------------------------------------------
def test_apply_rules_in_memory(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text('seed = 7\n'
                     '[[rule]]\nfreeze = ["layers.*"]\nexclude = ["*.bias"]\n'
                     '[[rule]]\ninit = "head.weight=normal(std=0.3)"\n'
                     '[[rule]]\nunfreeze = "layers.1"\n'
                     '[[rule]]\ninit = ["*.bias=zeros"]\nexclude = "head"\n')
    model = MLP()
    paramctl.apply_rules(model, rules)
    assert frozen(model) == {"layers.0.weight"}
    assert torch.count_nonzero(model.layers[0].bias) == 0
    assert torch.count_nonzero(model.head.bias) == 4
    same = MLP()
    paramctl.init_params(same, ["head.weight=normal(std=0.3)"], seed=7)
    assert torch.equal(same.head.weight, model.head.weight)  # seed from the file
    override = MLP()
    paramctl.apply_rules(override, rules, seed=8)
    assert not torch.equal(override.head.weight, model.head.weight)
    # parsed steps work the same as a path
    from paramctl.rules import load_rules_file

    steps, _ = load_rules_file(rules)
    third = MLP()
    paramctl.apply_rules(third, steps, seed=7)
    assert torch.equal(third.head.weight, model.head.weight) and frozen(third) == frozen(model)


def test_apply_rules_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\nfreeze = "layers"\n[[rule]]\nfreez = "head"\n')
    with pytest.raises(UsageError) as info:
        paramctl.apply_rules(MLP(), bad)
    assert "rule 2" in str(info.value) and "freez" in str(info.value)
    with pytest.raises(ParamctlError) as missing:
        paramctl.apply_rules(MLP(), tmp_path / "nope.toml")
    assert missing.value.exit_code == 1
    bad.write_text('[[rule]]\nfreeze = "decoder"\n')
    with pytest.raises(NoMatchError):
        paramctl.apply_rules(MLP(), bad)


# -- load_state_dict / frozen_names ----------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp.pt", "mlp.safetensors"])
def test_load_state_dict_weights_and_flags(sample: Callable[[str], Path],
                                           capsys: pytest.CaptureFixture[str],
                                           name: str) -> None:
    path = sample(name)
    assert paramctl.frozen_names(path) == []
    assert run(capsys, "freeze", path, "layers.1", "head.bias").returncode == 0
    assert sorted(paramctl.frozen_names(path)) == ["head.bias", "layers.1.bias",
                                                   "layers.1.weight"]
    model = MLP()
    paramctl.freeze(model, "layers.0")  # the file says layers.0 trains: that wins
    result = paramctl.load_state_dict(model, path, strict=True)
    assert isinstance(result, tuple) and tuple(result) == ([], [])
    missing, unexpected = result
    assert missing == [] and unexpected == []
    assert frozen(model) == {"head.bias", "layers.1.bias", "layers.1.weight"}
    on_disk = file_tensors(path)
    assert all(raw(p) == raw(on_disk[n]) for n, p in model.state_dict().items())


def test_load_state_dict_nested_and_tied(sample: Callable[[str], Path],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    nested = sample("transformer_nested.pt")
    assert run(capsys, "freeze", nested, "embed", "blocks.0").returncode == 0
    model = TinyTransformer()
    assert tuple(paramctl.load_state_dict(model, nested, key="model")) == ([], [])
    want = {n for n, _ in model.named_parameters(remove_duplicate=False)
            if n.startswith(("embed.", "blocks.0.", "lm_head."))}
    assert frozen(model) == want
    assert set(paramctl.frozen_names(nested)) == want
    assert set(paramctl.frozen_names(nested, key="model")) == want
    state = torch.load(nested, weights_only=True)["model"]
    assert all(torch.equal(p, state[n]) for n, p in model.state_dict().items())

    st = sample("transformer.safetensors")  # lm_head.weight dropped, tied to embed.weight
    assert run(capsys, "freeze", st, "embed").returncode == 0
    model = TinyTransformer()
    result = paramctl.load_state_dict(model, st, strict=True)
    assert tuple(result) == ([], [])
    assert not model.lm_head.weight.requires_grad and model.lm_head.weight is model.embed.weight


def test_load_state_dict_mismatch(sample: Callable[[str], Path]) -> None:
    path = sample("cnn.pt")
    model = MLP()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ParamctlError) as info:
        paramctl.load_state_dict(model, path)
    message = str(info.value)
    assert "layers.0.weight" in message and "features.0.weight" in message
    assert "strict=False" in message
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())

    cnn = SmallCNN(num_classes=10)
    bigger = nn.Sequential()
    bigger.add_module("features", cnn.features)
    bigger.add_module("classifier", cnn.classifier)
    bigger.add_module("extra", nn.Linear(2, 2))
    with pytest.raises(ParamctlError):
        paramctl.load_state_dict(bigger, path)
    missing, unexpected = paramctl.load_state_dict(bigger, path, strict=False)
    assert missing == ["extra.weight", "extra.bias"] and unexpected == []
    on_disk = torch.load(path, weights_only=True)
    assert torch.equal(bigger.features[0].weight, on_disk["features.0.weight"])
    assert torch.equal(bigger.features[1].running_var, on_disk["features.1.running_var"])

    smaller = nn.Module()
    smaller.classifier = nn.Linear(16, 10)
    missing, unexpected = paramctl.load_state_dict(smaller, path, strict=False)
    assert missing == [] and "features.0.weight" in unexpected
    assert torch.equal(smaller.classifier.weight, on_disk["classifier.weight"])


def test_frozen_names_errors(tmp_path: Path) -> None:
    with pytest.raises(ParamctlError):
        paramctl.frozen_names(tmp_path / "missing.pt")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ParamctlError):
        paramctl.frozen_names(junk)
    with pytest.raises(ParamctlError):
        paramctl.load_state_dict(MLP(), junk)
