"""The pattern language through the real CLI and API: an empty selection changes nothing,
only excludes are refused, unmatched excludes are fine, bare words, and the hints."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import REPO, folder_state, one_error_line, run_cli, sha

import paramctl
from paramctl.core import change, inspect
from paramctl.errors import UsageError
from paramctl.rules import Step
from sample_models.transformer import TinyTransformer

Sample = Callable[[str], Path]
CKPTS = ["transformer.pt", "transformer.safetensors"]


def flags(path: Path) -> dict[str, bool]:
    res = run_cli("list", path, "-f", "json")
    assert res.returncode == 0, res.stderr
    return {p["name"]: p["requires_grad"] for p in json.loads(res.stdout)["parameters"]}


def names(path: Path, *patterns: str) -> list[str]:
    res = run_cli("list", path, *patterns, "-f", "names")
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


# -- an empty selection changes nothing --------------------------------------------------------
@pytest.mark.parametrize("ckpt", CKPTS)
def test_grep_that_finds_nothing_freezes_nothing(sample: Sample, ckpt: str,
                                                 tmp_path: Path) -> None:
    """The pipeline from the bug report, run by a real shell."""
    path = sample(ckpt)
    before, stamp = flags(path), folder_state(tmp_path)
    assert all(before.values())
    paramctl_cmd = f"{shlex.quote(sys.executable)} -m paramctl"
    quoted = shlex.quote(str(path))
    script = (f"{paramctl_cmd} list {quoted} -f names | grep nosuchthing | "
              f"{paramctl_cmd} freeze {quoted} --names-from - --allow-empty -q")
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (res.stdout, res.stderr) == ("", "")
    assert folder_state(tmp_path) == stamp  # bytes, mtime and mode: nothing written
    assert flags(path) == before


@pytest.mark.parametrize("ckpt", CKPTS)
@pytest.mark.parametrize("command", ["freeze", "unfreeze"])
def test_empty_names_file_with_allow_empty_changes_nothing(sample: Sample, ckpt: str,
                                                           command: str,
                                                           tmp_path: Path) -> None:
    path = sample(ckpt)
    if command == "unfreeze":  # start from a file with everything frozen
        assert run_cli("freeze", path, "*", "-q").returncode == 0
    before = flags(path)
    assert set(before.values()) == {command == "freeze"}
    empty = tmp_path / "names.txt"
    empty.write_text("# nothing matched\n\n")
    stamp = folder_state(tmp_path)
    res = run_cli(command, path, "--names-from", empty, "--allow-empty", "-f", "tsv")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and res.stderr == ""
    assert folder_state(tmp_path) == stamp
    assert flags(path) == before
    # without --allow-empty an empty file is a usage error, as before
    res = run_cli(command, path, "--names-from", empty)
    assert res.returncode == 2
    assert one_error_line(res) == f"error: --names-from {empty} holds no names"
    assert folder_state(tmp_path) == stamp


def test_only_excludes_are_refused(sample: Sample, tmp_path: Path) -> None:
    path = sample("transformer.pt")
    stamp = folder_state(tmp_path)
    for command in ("freeze", "unfreeze"):
        res = run_cli(command, path, "!embed")
        assert res.returncode == 2, res.stderr
        assert one_error_line(res) == (
            "error: only excludes given ('!embed'): that selects nothing; write '*' '!embed' "
            "to select everything but embed")
    res = run_cli("init", path, "!embed=zeros")
    assert res.returncode == 2, res.stderr
    assert "only excludes given ('!embed')" in one_error_line(res)
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nfreeze = ["!embed", "!norm"]\n')
    stamp = folder_state(tmp_path)
    res = run_cli("apply", path, rules)
    assert res.returncode == 2, res.stderr
    assert "write '*' '!embed' '!norm' to select everything but embed, norm" in res.stderr
    # --exclude alone was already refused by the command line
    res = run_cli("freeze", path, "--exclude", "embed")
    assert res.returncode == 2
    assert folder_state(tmp_path) == stamp
    # and the suggested spelling does what it says (embed.weight is tied to lm_head, which
    # is frozen, so the example keeps norm instead)
    assert run_cli("freeze", path, "*", "!norm", "-q").returncode == 0
    assert [n for n, trains in flags(path).items() if trains] == ["norm.weight", "norm.bias"]


def test_the_looking_command_still_shows_everything(sample: Sample) -> None:
    path = sample("transformer.pt")
    everything = names(path)
    assert len(everything) == 36
    assert names(path, "!blocks") == ["embed.weight", "norm.weight", "norm.bias",
                                      "lm_head.weight"]
    res = run_cli("list", path, "--exclude", "blocks", "--exclude", "norm", "-f", "names")
    assert res.stdout.split() == ["embed.weight", "lm_head.weight"]


# -- excludes that match nothing ---------------------------------------------------------------
@pytest.mark.parametrize("ckpt", CKPTS)
def test_exclude_that_matches_nothing_is_fine(sample: Sample, ckpt: str) -> None:
    path = sample(ckpt)
    res = run_cli("freeze", path, "*", "-x", "lora_*", "-q")
    assert res.returncode == 0, res.stderr
    assert not any(flags(path).values())
    res = run_cli("unfreeze", path, "blocks.0", "!lora_A", "-x", "re:^adapter", "-q")
    assert res.returncode == 0, res.stderr
    assert {n for n, t in flags(path).items() if t} == set(names(path, "blocks.0"))
    # an include that matches nothing still fails
    res = run_cli("freeze", path, "lora_*", "-x", "lora_B")
    assert res.returncode == 3
    assert one_error_line(res).startswith("error: pattern 'lora_*' matched no parameter")


# -- bare words --------------------------------------------------------------------------------
def test_bare_words_match_a_component_at_any_depth(sample: Sample) -> None:
    path = sample("transformer.pt")
    assert names(path, "q_proj") == [
        "blocks.0.attn.q_proj.weight", "blocks.0.attn.q_proj.bias",
        "blocks.1.attn.q_proj.weight", "blocks.1.attn.q_proj.bias"]
    biases = names(path, "bias")
    assert biases == [n for n in names(path) if n.endswith(".bias")] and len(biases) == 17
    assert names(path, "norm") == ["norm.weight", "norm.bias"]  # not norm1 / norm2
    assert names(path, "1", "!bias") == names(path, "blocks.1.*", "!*.bias")
    # a dotted pattern still starts at the top
    res = run_cli("list", path, "attn.q_proj")
    assert res.returncode == 3


def test_freeze_bare_words_like_peft_target_modules(sample: Sample) -> None:
    path = sample("llama.safetensors")
    res = run_cli("freeze", path, "q_proj", "v_proj", "-q")
    assert res.returncode == 0, res.stderr
    assert sorted(paramctl.frozen_names(path)) == [
        f"model.layers.{i}.self_attn.{p}.weight" for i in (0, 1) for p in ("q_proj", "v_proj")]


# -- hints -------------------------------------------------------------------------------------
def test_hint_names_differ_only_in_case(sample: Sample) -> None:
    res = run_cli("list", sample("transformer.pt"), "Blocks")
    assert res.returncode == 3
    assert one_error_line(res) == ("error: pattern 'Blocks' matched no parameter; names "
                                   "differ only in case: blocks (use --allow-empty to accept)")


def test_hint_closest_modules(sample: Sample) -> None:
    res = run_cli("freeze", sample("transformer.pt"), "blocks.0.atn")
    assert res.returncode == 3
    assert "closest modules: blocks.0.attn" in one_error_line(res)
    res = run_cli("freeze", sample("transformer.pt"), "q_prj")
    assert "; closest name parts: q_proj" in one_error_line(res)


def test_hint_bracket_is_a_glob_character(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "odd.safetensors"
    save_file({"experts.[0].w": torch.zeros(2), "experts.[1].w": torch.ones(2)}, str(path))
    res = run_cli("freeze", path, "experts.[0].w")
    assert res.returncode == 3
    assert one_error_line(res) == (
        r"error: pattern 'experts.[0].w' matched no parameter; '[' is a glob character: "
        r"write 'experts.[[]0].w' or 're:^experts\.\[0\]\.w$' to match it literally "
        "(use --allow-empty to accept)")
    assert run_cli("freeze", path, "experts.[[]0].w", "-q").returncode == 0
    assert paramctl.frozen_names(path) == ["experts.[0].w"]


def test_hint_shell_expanded_an_unquoted_glob(sample: Sample, tmp_path: Path) -> None:
    sample("transformer.pt")
    sample("mlp.pt")
    # `paramctl freeze transformer.pt *.pt` in this folder: the shell passes both file names
    stamp = folder_state(tmp_path)
    res = run_cli("freeze", "transformer.pt", "mlp.pt", "transformer.pt", cwd=tmp_path)
    assert res.returncode == 3
    assert one_error_line(res) == (
        "error: pattern 'mlp.pt' matched no parameter; 'mlp.pt' is a file in the current "
        "folder: the shell probably expanded an unquoted glob, so quote your patterns "
        "(use --allow-empty to accept)")
    assert folder_state(tmp_path) == stamp


# -- the same contract in Python ---------------------------------------------------------------
def test_api_empty_selection_freezes_nothing() -> None:
    model = TinyTransformer()
    assert paramctl.freeze(model, []) == []
    assert all(p.requires_grad for p in model.parameters())
    assert paramctl.freeze(model, [], allow_empty=True) == []
    for p in model.parameters():
        p.requires_grad_(False)
    assert paramctl.unfreeze(model, []) == []
    assert not any(p.requires_grad for p in model.parameters())
    assert paramctl.init_params(model, [], seed=0) == []


def test_api_only_excludes_is_a_usage_error() -> None:
    model = TinyTransformer()
    with pytest.raises(UsageError, match=r"only excludes given \('!blocks'\)"):
        paramctl.freeze(model, "!blocks")
    with pytest.raises(UsageError, match=r"write '\*' '!blocks'"):
        paramctl.freeze(model, [], excludes=["blocks"])
    with pytest.raises(UsageError):
        paramctl.init_params(model, ["!blocks=zeros"])
    assert all(p.requires_grad for p in model.parameters())
    changed = paramctl.freeze(model, "*", excludes=["lora_*", "blocks"])
    # lm_head.weight is embed.weight (tied): frozen with it, not changed a second time
    assert changed == ["embed.weight", "norm.weight", "norm.bias"]


def test_change_refuses_no_steps_and_writes_nothing_for_an_empty_step(
        sample: Sample, tmp_path: Path) -> None:
    path = sample("transformer.pt")
    stamp = folder_state(tmp_path)
    with pytest.raises(UsageError, match="nothing to do"):
        change(str(path), [])
    for allow_empty in (True, False):
        result = change(str(path), [Step("freeze", exact=())], allow_empty=allow_empty)
        assert result.changes == [] and result.written is None
    assert folder_state(tmp_path) == stamp
    digest = sha(path)
    assert len(inspect(str(path)).params) == 36
    assert len(inspect(str(path), ["!blocks"]).params) == 4
    assert sha(path) == digest


def test_swapped_arguments_are_named(sample: Sample, tmp_path: Path) -> None:
    path = sample("transformer.pt")
    for command in ("freeze", "list"):
        res = run_cli(command, "blocks.*", path.name, cwd=tmp_path)
        assert res.returncode == 1
        line = one_error_line(res)
        assert f"arguments swapped? the checkpoint comes first: paramctl {command} " \
               f"{path.name} 'blocks.*'" in line
