"""`paramctl apply RULES.toml`: ordered freeze / unfreeze / init steps in one load and one
save, `seed` in the file, and errors that name the rule and key."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import folder_state
from helpers import run_inproc as run
from safetensors.torch import load_file

import paramctl
from paramctl.core import change
from paramctl.rules import load_rules_file

CliFn = Callable[..., subprocess.CompletedProcess[str]]


def tensors(path: Path, key: str | None = None) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return dict(load_file(str(path)))
    root = torch.load(path, weights_only=True)
    return dict(root[key] if key else root)


def raw(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


RULES = """\
seed = 5

[[rule]]
freeze = ["blocks.*", "norm"]
exclude = ["*.bias", "blocks.1.mlp"]

[[rule]]
unfreeze = "blocks.0.attn.q_proj"

[[rule]]
init = ["blocks.1.mlp.fc1.weight=normal(std=0.02)", "*.bias=zeros"]
exclude = ["norm", "blocks.0.attn.q_proj"]

[[rule]]
freeze = "blocks.1.mlp.fc1"
"""

BIASES = {f"blocks.{i}.{m}.bias" for i in (0, 1) for m in (
    "norm1", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "norm2",
    "mlp.fc1", "mlp.fc2")} - {"blocks.0.attn.q_proj.bias"}


@pytest.mark.parametrize("name", ["transformer.pt", "transformer.safetensors",
                                  "transformer_nested.pt"])
def test_apply_steps_in_order(sample: Callable[[str], Path], samples_dir: Path,
                              tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              name: str) -> None:
    path = sample(name)
    key = "model" if "nested" in name else None
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    before = tensors(path, key)
    res = run(capsys, "apply", path, rules)
    assert res.returncode == 0, res.stderr

    frozen = set(paramctl.frozen_names(path))
    want = {n for n in before if (n.startswith("blocks.") or n.startswith("norm."))
            and not n.endswith(".bias") and not n.startswith("blocks.1.mlp.")
            and not n.startswith("blocks.0.attn.q_proj.")} | {"blocks.1.mlp.fc1.weight",
                                                              "blocks.1.mlp.fc1.bias"}
    assert frozen == want

    after = tensors(path, key)
    inited = {"blocks.1.mlp.fc1.weight"} | BIASES
    assert list(after) == list(before)
    for n, t in before.items():
        if n not in inited:
            assert raw(after[n]) == raw(t), n
    for n in BIASES:
        assert torch.equal(after[n], torch.zeros_like(before[n])), n
    assert torch.count_nonzero(after["blocks.0.attn.q_proj.bias"]) == 32
    w = after["blocks.1.mlp.fc1.weight"]
    assert abs(w.std().item() - 0.02) < 0.002

    # the seed in the file gives the same tensor as `init --seed 5` with that rule
    ref = tmp_path / f"ref{path.suffix}"
    shutil.copyfile(samples_dir / name, ref)
    res = run(capsys, "init", ref, "blocks.1.mlp.fc1.weight=normal(std=0.02)", "--seed", "5")
    assert res.returncode == 0, res.stderr
    assert raw(tensors(ref, key)["blocks.1.mlp.fc1.weight"]) == raw(w)
    if key:
        root, original = torch.load(path, weights_only=True), torch.load(
            samples_dir / name, weights_only=True)
        assert root["epoch"] == 3 and root["config"] == original["config"]
        assert torch.equal(root["optimizer"]["state"][0]["exp_avg"],
                           original["optimizer"]["state"][0]["exp_avg"])
        assert root["optimizer"]["param_groups"] == original["optimizer"]["param_groups"]


def test_apply_seed_from_file_matches_init(sample: Callable[[str], Path], samples_dir: Path,
                                           tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    a = sample("mlp.safetensors")
    b = tmp_path / "b.safetensors"
    c = tmp_path / "c.safetensors"
    b.write_bytes(a.read_bytes())
    c.write_bytes(a.read_bytes())
    rules = tmp_path / "rules.toml"
    rules.write_text('seed = 42\n[[rule]]\ninit = "head.weight=normal(std=0.5)"\n'
                     '[[rule]]\nfreeze = "head"\n')
    assert run(capsys, "apply", a, rules).returncode == 0
    assert run(capsys, "apply", b, rules).returncode == 0
    assert a.read_bytes() == b.read_bytes()  # seeded by the file: reproducible
    res = run(capsys, "init", c, "head.weight=normal(std=0.5)", "--seed", "42")
    assert res.returncode == 0, res.stderr
    assert raw(tensors(a)["head.weight"]) == raw(tensors(c)["head.weight"])
    assert set(paramctl.frozen_names(a)) == {"head.weight", "head.bias"}
    # --seed on the command line takes precedence over the file
    d = tmp_path / "d.safetensors"
    e = tmp_path / "e.safetensors"
    shutil.copyfile(samples_dir / "mlp.safetensors", d)
    e.write_bytes(d.read_bytes())
    assert run(capsys, "apply", d, rules, "--seed", "43").returncode == 0
    assert run(capsys, "init", e, "head.weight=normal(std=0.5)", "--seed", "43").returncode == 0
    assert raw(tensors(d)["head.weight"]) == raw(tensors(e)["head.weight"])
    assert raw(tensors(d)["head.weight"]) != raw(tensors(a)["head.weight"])


def test_apply_later_steps_override(sample: Callable[[str], Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    a, b = sample("mlp.pt"), sample("mlp.safetensors")
    first = tmp_path / "first.toml"
    first.write_text('[[rule]]\nfreeze = "*"\n[[rule]]\nunfreeze = "head"\n')
    second = tmp_path / "second.toml"
    second.write_text('[[rule]]\nunfreeze = "head"\n[[rule]]\nfreeze = "*"\n')
    assert run(capsys, "apply", a, first).returncode == 0
    assert set(paramctl.frozen_names(a)) == {"layers.0.weight", "layers.0.bias",
                                             "layers.1.weight", "layers.1.bias"}
    assert run(capsys, "apply", b, second).returncode == 0
    assert len(paramctl.frozen_names(b)) == 6
    # freeze then unfreeze of the same names is no change at all: nothing is written
    undo = tmp_path / "undo.toml"
    undo.write_text('[[rule]]\nunfreeze = "layers"\n[[rule]]\nfreeze = "layers"\n')
    stamp = folder_state(tmp_path)
    res = run(capsys, "apply", a, undo)
    assert res.returncode == 0, res.stderr
    assert folder_state(tmp_path) == stamp


def test_apply_is_one_load_and_one_save(sample: Callable[[str], Path], tmp_path: Path) -> None:
    path = sample("llama.pt")
    rules = tmp_path / "rules.toml"
    rules.write_text('seed = 1\n[[rule]]\nfreeze = "model.layers"\n'
                     '[[rule]]\ninit = "lm_head=normal(std=0.01)"\n'
                     '[[rule]]\nunfreeze = "model.layers.1"\n'
                     '[[rule]]\ninit = "*norm*=ones"\n')
    steps, seed = load_rules_file(rules)
    assert seed == 1 and [s.kind for s in steps] == ["freeze", "init", "unfreeze", "init"]
    seen: list[tuple[int, int]] = []
    result = change(str(path), steps, seed=seed, progress=lambda n, total: seen.append((n, total)))
    assert result.written is not None
    total = seen[0][1]
    assert {t for _, t in seen} == {total}
    assert sum(n for n, _ in seen) <= total  # the file was streamed once
    frozen = set(paramctl.frozen_names(path))
    assert frozen and all(n.startswith("model.layers.0.") for n in frozen)


def test_apply_dry_run(sample: Callable[[str], Path], tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    path = sample("cnn.safetensors")
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nfreeze = "features"\n[[rule]]\ninit = "classifier.bias=zeros"\n')
    stamp = folder_state(tmp_path)
    res = run(capsys, "apply", path, rules, "--dry-run")
    assert res.returncode == 0, res.stderr
    names = {r.split("\t")[0] for r in res.stdout.splitlines()}
    assert "classifier.bias" in names and "features.0.weight" in names
    assert "features.1.num_batches_tracked" not in names
    assert folder_state(tmp_path) == stamp


ERRORS = [
    # (toml text, exit code, fragments)
    ('[[rule]]\nfreeze = "layers"\n[[rule]]\nfreez = "head"\n', 2, ["rule 2", "'freez'"]),
    ('[[rule]]\nfreeze = "layers"\ninit = "head=zeros"\n', 2, ["rule 1", "freeze", "init"]),
    ('[[rule]]\nfreeze = "layers"\nunfreeze = "head"\n', 2, ["rule 1"]),
    ('[[rule]]\nexclude = "layers"\n', 2, ["rule 1"]),
    ('[[rule]]\nfreeze = "layers"\n[[rule]]\ninit = "*=zeross"\n', 2,
     ["rule 2", "zeross", "valid"]),
    ('[[rule]]\nfreeze = "layers"\n[[rule]]\ninit = ["*.bias=zeros", "*=normal(sd=1)"]\n', 2,
     ["rule 2", "'sd'", "std"]),
    ('[[rule]]\nfreeze = ["layers", 3]\n', 2, ["rule 1", "freeze"]),
    ('[[rule]]\nfreeze = []\n', 2, ["rule 1", "freeze"]),
    ('[[rule]]\nfreeze = "layers"\nexclude = 7\n', 2, ["rule 1", "exclude"]),
    ('seed = "one"\n[[rule]]\nfreeze = "layers"\n', 2, ["seed"]),
    ('seeds = 1\n[[rule]]\nfreeze = "layers"\n', 2, ["'seeds'"]),
    ('[[rule]\nfreeze = "layers"\n', 2, ["invalid TOML"]),
    ('freeze = "layers"\n', 2, ["'freeze'"]),
    ("", 2, ["[[rule]]"]),
    ('[[rule]]\nfreeze = "nothing.here"\n', 3, ["nothing.here"]),
    ('[[rule]]\ninit = "*=zeros"\n', 1, ["cannot initialise buffer features.1.running_mean"]),
    ('[[rule]]\nfreeze = "features"\n[[rule]]\ninit = "features.0.bias=eye"\n', 1,
     ["features.0.bias"]),
]


@pytest.mark.parametrize(("text", "code", "fragments"), ERRORS,
                         ids=[f"e{i}" for i in range(len(ERRORS))])
def test_apply_errors(sample: Callable[[str], Path], tmp_path: Path,
                      capsys: pytest.CaptureFixture[str], text: str, code: int,
                      fragments: list[str]) -> None:
    path = sample("cnn.pt" if "features" in text or "*=zeros" in text else "mlp.safetensors")
    rules = tmp_path / "rules.toml"
    rules.write_text(text)
    stamp = folder_state(tmp_path)
    res = run(capsys, "apply", path, rules)
    assert res.returncode == code, res.stderr
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    for fragment in fragments:
        assert fragment in res.stderr, (fragment, res.stderr)
    if code == 2 and "TOML" not in fragments[0]:
        assert str(rules) in res.stderr  # says which file
    assert folder_state(tmp_path) == stamp


def test_apply_missing_rules_file(sample: Callable[[str], Path], tmp_path: Path,
                                  cli: CliFn) -> None:
    path = sample("mlp.pt")
    stamp = folder_state(tmp_path)
    res = cli("apply", path, tmp_path / "nope.toml")
    assert res.returncode == 1
    assert res.stderr.startswith("error: ") and "nope.toml" in res.stderr
    assert "Traceback" not in res.stderr
    assert folder_state(tmp_path) == stamp
