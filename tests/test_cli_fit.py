"""Trust and fit with the fine-tuning ecosystem: one test per promise, through the real CLI
(subprocesses, real exit codes and streams) and the real API.

1 bare ``paramctl``; 2 every example in ``--help`` and the README runs; 3 TSV columns and
escaping; 4 ``wrote PATH`` and ``-q`` everywhere; 5 shell completion; 6 ``--summary``;
7 ``strip_prefix``; 8 ``apply_frozen`` and the Lightning callback; 9 ``--fail-if-any``, the
lock message and ``--wait``; 10 closed and full stdout; 11 read-only and Hugging Face cache
files; 12 ``apply`` errors name the rule.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import REPO, one_error_line, run_cli, sha

import paramctl
from paramctl.errors import ParamctlWarning, SourceError
from sample_models.mlp import MLP
from sample_models.transformer import TinyTransformer

Sample = Callable[[str], Path]
COMMANDS = ["list", "freeze", "unfreeze", "init", "apply", "mem", "convert", "stats", "diff"]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
PARAMCTL = f"{sys.executable} -m paramctl"


def bash(script: str, cwd: Path, *, env: dict[str, str] | None = None,
         timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``bash -o pipefail -c SCRIPT``: a pipeline fails when any of its commands does."""
    return subprocess.run(["bash", "-o", "pipefail", "-c", script], cwd=cwd,
                          env=env or ENV, capture_output=True, text=True, timeout=timeout)


def ok(*args: object, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    res = run_cli(*args, **kwargs)
    assert res.returncode == 0, res.stderr
    return res


def list_json(path: Path, *extra: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(ok("list", path, "-f", "json", *extra).stdout)
    return doc


def tsv_rows(text: str) -> list[list[str]]:
    return [line.split("\t") for line in text.splitlines()]


# -- LoRA: a real PEFT model's state dict -----------------------------------------------------
@dataclass(frozen=True)
class Lora:
    path: Path  # torch.save(peft_model.state_dict()): plain tensors, nothing recorded frozen
    peft_line: str  # what peft's print_trainable_parameters() printed for that model


@pytest.fixture(scope="session")
def lora(tmp_path_factory: pytest.TempPathFactory) -> Lora:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(LlamaForCausalLM(config),
                               LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        model.print_trainable_parameters()
    path = tmp_path_factory.mktemp("lora") / "lora.pt"
    torch.save(model.state_dict(), path)
    return Lora(path, printed.getvalue().strip())


# -- 1. bare paramctl -------------------------------------------------------------------------
def test_bare_paramctl_prints_short_usage_on_stderr() -> None:
    res = run_cli()
    assert res.returncode == 2
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert lines[0] == "usage: paramctl COMMAND [ARGS]..."
    assert "\\n" not in res.stderr and "error:" not in res.stderr
    assert len(lines) <= 15
    assert [ln.split()[0] for ln in lines if ln.startswith("  ")] == COMMANDS
    assert "run 'paramctl COMMAND --help'" in res.stderr


# -- 2. every example runs --------------------------------------------------------------------
# What the placeholder names in the examples are when the examples run: each example runs
# in a fresh copy of a folder holding these (plus `sample_models/` linked from the repo,
# `rules.toml` from the TOML shown next to the example, and HOME in the folder).
PLACEHOLDERS = {
    "ckpt.pt": "samples/transformer.pt (embed, blocks.{0,1}.{attn,mlp,...}, norm, lm_head "
               "tied to embed)",
    "model.safetensors": "samples/llama.safetensors (model.embed_tokens, model.layers.{0,1}, "
                         "lm_head; no biases)",
    "llama/": "samples/llama.safetensors as a sharded folder (6 shards and the index)",
    "ckpt_dcp/": "a DCP folder of {'model': MLP().state_dict()} (model.layers.*, model.head)",
    "lora.pt": "a PEFT LoRA state dict (tiny Llama, q_proj/v_proj adapters), every tensor but "
               "the adapters frozen by paramctl",
    "/tmp/paramctl-samples/": "samples/: every sample checkpoint, as make_checkpoints.py "
                              "writes it",
    "ddp.pt": "a DDP training checkpoint: {'model': transformer.pt's state dict with a "
              "'module.' prefix, 'epoch': 3}",
    "base.safetensors": "samples/llama.safetensors",
    "tuned.safetensors": "llama.safetensors with model.layers.0 re-initialised",
    "tuned.pt": "tuned.safetensors as a torch file",
    "model.gguf": "a tiny GGUF written by gguf.GGUFWriter (token_embd, blk.0.*, output)",
}
SAMPLE_COPIES = {"ckpt.pt": "transformer.pt", "model.safetensors": "llama.safetensors"}
# Examples that cannot run here, each with why: matched by a substring of the command.
SKIPS = {
    "pip install": "installs packages from the network",
    "python -m pytest": "runs this test suite",
    "torchrun": "a two-process gloo launch (~10 s); tests/test_dcp.py runs the same init "
                "under torch.distributed.run",
    "hf://": "a remote source: needs the network",
    "https://": "a remote source: needs the network",
}


def _make_gguf(path: Path) -> None:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    rng = np.random.default_rng(0)
    for name, shape in [("token_embd.weight", (32, 16)), ("blk.0.attn_q.weight", (16, 16)),
                        ("blk.0.attn_norm.weight", (16,)), ("output.weight", (32, 16))]:
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@dataclass(frozen=True)
class Example:
    where: str  # "README.md:123" or "paramctl init --help"
    command: str
    rules: str | None = None  # the rules.toml shown with it

    def __str__(self) -> str:
        return f"{self.where}: {self.command}"


def _help_examples() -> list[Example]:
    import typer

    from paramctl.cli import HELP, app

    group = typer.main.get_command(app)
    ctx = typer.Context(group, info_name="paramctl")
    texts = {"paramctl --help": HELP}
    assert isinstance(group, typer.core.TyperGroup)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        texts[f"paramctl {name} --help"] = command.epilog or "" if command else ""
    out = []
    for where, text in texts.items():
        rules = None
        if "Example rules.toml:" in text:
            block = text.split("Example rules.toml:", 1)[1].split("and the command:", 1)[0]
            rules = textwrap.dedent(block.replace("\b", "")).strip() + "\n"
        for line in text.splitlines():
            if line.strip().startswith("paramctl "):
                out.append(Example(where, line.strip(), rules))
    return out


def _readme_examples() -> list[Example]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = list(re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S))
    tomls = [m.group(2) for m in blocks if m.group(1) == "toml"]
    assert len(tomls) == 1, "the README's one rules file is written as rules.toml"
    out = []
    for m in blocks:
        lang, body = m.group(1), m.group(2)
        first = text.count("\n", 0, m.start()) + 2
        for i, line in enumerate(body.splitlines()):
            if lang == "console":
                command = line[2:] if line.startswith("$ ") else ""
            elif lang in ("bash", "sh", "shell"):
                command = "" if line.lstrip().startswith("#") else line.strip()
            else:
                command = ""
            if command:
                out.append(Example(f"README.md:{first + i}", command, tomls[0]))
    return out


EXAMPLES = _help_examples() + _readme_examples()


def _make_dcp(folder: Path) -> None:
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": MLP().state_dict()}, checkpoint_id=str(folder), no_dist=True)


@pytest.fixture(scope="session")
def examples_home(samples_dir: Path, lora: Lora,
                  tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder every example starts from (copied per example): see PLACEHOLDERS."""
    home = tmp_path_factory.mktemp("examples")
    shutil.copytree(samples_dir, home / "samples")
    for name, sample_name in SAMPLE_COPIES.items():
        shutil.copyfile(samples_dir / sample_name, home / name)
    ok("unfreeze", home / "samples" / "llama.safetensors", "*", "-o", home / "llama",
       "--max-shard-size", "100KB", "-q")
    _make_dcp(home / "ckpt_dcp")
    shutil.copyfile(lora.path, home / "lora.pt")
    ok("freeze", home / "lora.pt", "*", "-x", "*lora_*", "-q")
    state = torch.load(samples_dir / "transformer.pt", weights_only=True)
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3},
               home / "ddp.pt")
    shutil.copyfile(samples_dir / "llama.safetensors", home / "base.safetensors")
    ok("init", home / "base.safetensors", "model.layers.0.*=zeros", "-o",
       home / "tuned.safetensors", "-q")
    ok("convert", home / "tuned.safetensors", "-o", home / "tuned.pt", "-q")
    _make_gguf(home / "model.gguf")
    (home / "sample_models").symlink_to(REPO / "sample_models")
    (home / "bin").mkdir()
    shim = home / "bin" / "paramctl"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m paramctl "$@"\n')
    shim.chmod(0o755)
    (home / "home").mkdir()
    return home


def test_examples_were_found() -> None:
    wheres = {e.where.split(":")[0] for e in EXAMPLES}
    assert {f"paramctl {c} --help" for c in COMMANDS} | {"paramctl --help", "README.md"} <= wheres
    assert len(EXAMPLES) > 40


@pytest.mark.parametrize("example", EXAMPLES, ids=str)
def test_example_runs(example: Example, examples_home: Path, tmp_path: Path) -> None:
    for marker, reason in SKIPS.items():
        if marker in example.command:
            pytest.skip(f"{example}: {reason}")
    work = tmp_path / "run"
    shutil.copytree(examples_home, work, symlinks=True)
    if example.rules is not None:
        (work / "rules.toml").write_text(example.rules, encoding="utf-8")
    command = example.command.replace("/tmp/paramctl-samples/", f"{work}/samples/")
    env = {"PATH": f"{work / 'bin'}:{Path(sys.executable).parent}:/usr/bin:/bin",
           "HOME": str(work / "home"), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "LANG": "C.UTF-8"}
    res = bash(command, work, env=env)
    assert res.returncode == 0, f"{example}\nexit {res.returncode}\n{res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr


def test_init_example_on_a_weight_and_bias_module_is_fixed(sample: Sample) -> None:
    """The old init example ('classifier=kaiming_uniform(a=2.23)') failed on the bias;
    what the help shows now selects weights only."""
    path = sample("cnn.safetensors")
    bad = run_cli("init", path, "classifier=kaiming_uniform(a=2.23)", "--dry-run")
    assert bad.returncode == 1 and "classifier.bias" in bad.stderr
    ok("init", path, "classifier.weight=kaiming_uniform(a=2.23)", "--dry-run")
    init_help = ok("init", "--help").stdout
    assert "'classifier=kaiming_uniform" not in init_help


# -- 3. TSV: the tied column, the changes columns, escaping -----------------------------------
def test_list_tsv_has_a_tied_column(samples_dir: Path) -> None:
    path = samples_dir / "transformer.pt"
    rows = {r[0]: r for r in tsv_rows(ok("list", path, "-f", "tsv").stdout)}
    assert all(len(r) == 6 for r in rows.values())
    assert rows["embed.weight"][5] == "lm_head.weight"
    assert rows["lm_head.weight"][5] == "embed.weight"
    assert rows["norm.bias"] == ["norm.bias", "32", "float32", "32", "true", ""]
    # awk-style sums: counting only rows that are untied or first in their group
    seen: set[str] = set()
    total = 0
    for name, row in rows.items():
        if not (set(row[5].split(",")) & seen if row[5] else set()):
            total += int(row[3])
        seen.add(name)
    assert total == list_json(path)["totals"]["numel"]
    header = ok("list", path, "-f", "tsv", "--headers").stdout.splitlines()[0]
    assert header == "name\tshape\tdtype\tnumel\trequires_grad\ttied"


def test_changes_tsv_columns_and_no_trailing_empty_field(sample: Sample) -> None:
    path = sample("transformer.pt")
    res = ok("freeze", path, "lm_head", "norm", "-f", "tsv", "--headers")
    lines = res.stdout.splitlines()
    assert lines[0] == "name\taction\tvia\trequires_grad_before\trequires_grad_after"
    rows = {r[0]: r for r in tsv_rows("\n".join(lines[1:]))}
    assert rows["embed.weight"] == ["embed.weight", "freeze", "lm_head.weight", "true", "false"]
    assert rows["norm.bias"] == ["norm.bias", "freeze", "", "true", "false"]
    assert not any(line.endswith("\t") for line in lines)
    res = ok("init", path, "norm.bias=zeros", "--seed", "0", "-f", "tsv")
    assert tsv_rows(res.stdout) == [["norm.bias", "zeros()", "", "false", "false"]]
    for command in ("freeze", "init", "apply"):
        assert "requires_grad_before" in ok(command, "--help").stdout


ODD = ["odd\tname.weight", "line\nbreak.weight", "back\\slash.weight"]


def test_names_with_tab_newline_backslash_are_escaped(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "odd.safetensors"
    save_file({**{n: torch.ones(2) for n in ODD}, "plain.weight": torch.ones(3)}, str(path))
    escaped = {"odd\\tname.weight", "line\\nbreak.weight", "back\\\\slash.weight",
               "plain.weight"}
    tsv = ok("list", path, "-f", "tsv").stdout
    assert len(tsv.splitlines()) == 4
    assert all(len(r) == 6 for r in tsv_rows(tsv))
    assert {r[0] for r in tsv_rows(tsv)} == escaped
    assert set(ok("list", path, "-f", "names").stdout.splitlines()) == escaped
    assert {p["name"] for p in list_json(path)["parameters"]} == {*ODD, "plain.weight"}
    # names output feeds back into --names-from, escapes and all
    res = bash(f"{PARAMCTL} list {path} -f names | grep -v plain | "
               f"{PARAMCTL} freeze {path} --names-from - -f names", tmp_path)
    assert res.returncode == 0, res.stderr
    assert set(res.stdout.splitlines()) == escaped - {"plain.weight"}
    assert set(paramctl.frozen_names(path)) == set(ODD)


# -- 4. wrote PATH, -q everywhere -------------------------------------------------------------
def test_every_write_says_wrote_path_on_stderr(sample: Sample, tmp_path: Path) -> None:
    path = sample("mlp.pt")
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nunfreeze = "head"\n', encoding="utf-8")
    for args in (["freeze", path, "head"], ["unfreeze", path, "head"],
                 ["init", path, "head.bias=zeros"], ["freeze", path, "head", "-f", "json"],
                 ["freeze", path, "*", "-o", tmp_path / "out.safetensors"]):
        res = ok(*args)  # stdout is a pipe here
        out = args[-1] if args[-2] == "-o" else path
        assert res.stderr.splitlines()[-1] == f"wrote {out}", args
        assert not any(ln.startswith("wrote ") for ln in res.stdout.splitlines())
    res = ok("apply", path, rules)
    assert res.stderr == f"wrote {path}\n"
    quiet = ok("freeze", path, "layers", "-q")
    assert quiet.stdout == "" and quiet.stderr == ""
    dry = ok("unfreeze", path, "layers", "--dry-run")
    assert dry.stderr == ""


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_quiet(command: str) -> None:
    assert re.search(r"-q, --quiet", ok(command, "--help").stdout)


def test_quiet_list_and_mem_print_only_the_data(samples_dir: Path) -> None:
    path = samples_dir / "mlp.safetensors"
    for command in (["list", path, "-f", "names"], ["mem", path]):
        loud = ok(*command, "--strip-prefix", "nope")
        assert loud.stderr.startswith("warning: strip prefix 'nope.' matches no name")
        quiet = ok(*command, "--strip-prefix", "nope", "-q")
        assert quiet.stderr == "" and quiet.stdout == loud.stdout


# -- 5. shell completion ----------------------------------------------------------------------
def test_shell_completion(tmp_path: Path) -> None:
    shown = ok("--show-completion", "bash")
    assert "_PARAMCTL_COMPLETE" in shown.stdout and "complete " in shown.stdout
    home = tmp_path / "home"
    home.mkdir()
    installed = ok("--install-completion", "bash", env={"HOME": str(home)})
    assert "completion installed" in installed.stdout
    assert "paramctl" in (home / ".bashrc").read_text(encoding="utf-8")
    # what the installed script runs on <TAB>
    res = ok(env={"_PARAMCTL_COMPLETE": "complete_bash", "COMP_WORDS": "paramctl fr",
                  "COMP_CWORD": "1"})
    assert res.stdout.split() == ["freeze"]
    assert "--install-completion" in ok("--help").stdout


# -- 6. --summary -----------------------------------------------------------------------------
def test_summary_is_peft_line(lora: Lora, tmp_path: Path, samples_dir: Path) -> None:
    path = tmp_path / "lora.pt"
    shutil.copyfile(lora.path, path)
    ok("freeze", path, "*", "-x", "*lora_*", "-q")
    assert ok("list", path, "--summary").stdout == lora.peft_line + "\n"
    assert re.fullmatch(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| "
                        r"trainable%: \d+\.\d{4}", lora.peft_line)
    # buffers and integer tensors count in "all params" (as list's totals), never trainable
    cnn = samples_dir / "cnn.pt"
    t = list_json(cnn)["totals"]
    assert ok("list", cnn, "--summary").stdout == (
        f"trainable params: {t['trainable']:,} || all params: {t['numel']:,} || "
        f"trainable%: {100 * t['trainable'] / t['numel']:.4f}\n")
    assert "buffers" in ok("list", "--help").stdout
    assert run_cli("list", cnn, "--summary", "-f", "json").returncode == 2


# -- 7. strip_prefix --------------------------------------------------------------------------
@pytest.fixture
def compiled_ddp(tmp_path: Path) -> Path:
    """An MLP state dict saved from torch.compile(DDP(model)): `_orig_mod.module.` names."""
    torch.manual_seed(0)
    path = tmp_path / "ddp.pt"
    torch.save({f"_orig_mod.module.{k}": v for k, v in MLP().state_dict().items()}, path)
    return path


def test_strip_prefix_repeats_implies_the_dot_and_warns(compiled_ddp: Path) -> None:
    names = ok("list", compiled_ddp, "-f", "names", "--strip-prefix", "_orig_mod",
               "--strip-prefix", "module.").stdout.splitlines()
    assert names == [n for n, _ in MLP().named_parameters()]
    res = ok("list", compiled_ddp, "-f", "names", "--strip-prefix", "module")
    assert res.stderr == (f"warning: strip prefix 'module.' matches no name in {compiled_ddp} "
                          "(names start with _orig_mod.)\n")
    assert res.stdout.splitlines()[0] == "_orig_mod.module.layers.0.weight"
    ok("freeze", compiled_ddp, "head", "--strip-prefix", "_orig_mod", "--strip-prefix", "module",
       "-q")
    assert paramctl.frozen_names(compiled_ddp) == ["_orig_mod.module.head.weight",
                                                   "_orig_mod.module.head.bias"]


def test_load_state_dict_strip_prefix_and_mismatch_hint(compiled_ddp: Path) -> None:
    ok("freeze", compiled_ddp, "_orig_mod.module.head", "-q")
    with pytest.raises(SourceError) as err:
        paramctl.load_state_dict(MLP(), compiled_ddp)
    message = str(err.value)
    assert "head.weight (+1 more)" in message  # 6 names: five shown, and how many are not
    assert "pass strip_prefix='_orig_mod.module.'" in message
    model = MLP()
    assert paramctl.load_state_dict(model, compiled_ddp, strip_prefix=["_orig_mod", "module"]) \
        == ([], [])
    assert not model.head.weight.requires_grad and model.layers[0].weight.requires_grad
    expected = torch.load(compiled_ddp, weights_only=True)
    assert torch.equal(model.layers[0].weight, expected["_orig_mod.module.layers.0.weight"])
    with pytest.raises(SourceError, match=r"pass strip_prefix='module\.'"):
        paramctl.load_state_dict(MLP(), compiled_ddp, strip_prefix="_orig_mod")
    with pytest.warns(ParamctlWarning, match="'module.' matches no name"), \
            pytest.raises(SourceError):
        paramctl.load_state_dict(MLP(), compiled_ddp, strip_prefix="module")


# -- 8. apply_frozen and the Lightning callback -----------------------------------------------
def test_apply_frozen_sets_only_the_flags(sample: Sample) -> None:
    path = sample("transformer.safetensors")  # lm_head.weight is not stored: tied to embed
    ok("freeze", path, "embed", "blocks.0.attn", "-q")
    torch.manual_seed(1)
    model = TinyTransformer()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = paramctl.apply_frozen(model, path)
    assert set(frozen) == {"embed.weight", "lm_head.weight"} | {
        n for n, _ in model.named_parameters() if n.startswith("blocks.0.attn.")}
    assert {n for n, p in model.named_parameters(remove_duplicate=False)
            if not p.requires_grad} == set(frozen)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # no weights


def test_apply_frozen_reports_names_the_model_lacks(compiled_ddp: Path) -> None:
    ok("freeze", compiled_ddp, "_orig_mod.module.head", "-q")
    model = MLP()
    with pytest.warns(ParamctlWarning) as caught:
        assert paramctl.apply_frozen(model, compiled_ddp) == []
    message = str(caught[0].message)
    assert message.startswith(f"2 names recorded frozen in {compiled_ddp} are not a parameter")
    assert "pass strip_prefix='_orig_mod.module.'" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert paramctl.apply_frozen(model, compiled_ddp, strip_prefix="_orig_mod.module") == [
            "head.weight", "head.bias"]
    assert "apply_frozen" in paramctl.__all__


def test_lightning_callback_freezes_before_the_optimizer_exists(sample: Sample) -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from paramctl.lightning import ApplyFrozen

    path = sample("mlp.pt")
    ok("freeze", path, "layers", "-q")

    class Regressor(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = MLP()

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.mse_loss(self.model(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            # the usual fine-tuning filter: only what trains goes to the optimizer
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)

    torch.manual_seed(0)
    module = Regressor()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    data = DataLoader(TensorDataset(torch.randn(16, 16), torch.randn(16, 4)), batch_size=4)
    callback = ApplyFrozen(path, submodule="model")
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, data)
    assert trainer.global_step == 3
    assert callback.frozen == ["layers.0.weight", "layers.0.bias", "layers.1.weight",
                               "layers.1.bias"]
    in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    for name, p in module.named_parameters():
        if name.startswith("model.layers."):
            assert id(p) not in in_optimizer, name
            assert torch.equal(p, before[name]), name
        else:
            assert id(p) in in_optimizer and not torch.equal(p, before[name]), name


def test_lightning_stays_out_of_import_paramctl() -> None:
    code = ("import sys, paramctl; paramctl.apply_frozen; "
            "assert not [m for m in sys.modules if 'lightning' in m]")
    subprocess.run([sys.executable, "-c", code], env=ENV, check=True)


# -- 9. CI gate, lock message, --wait ---------------------------------------------------------
def test_fail_if_any_exits_4_on_a_selection(sample: Sample) -> None:
    path = sample("mlp.pt")
    res = run_cli("list", path, "--trainable", "-x", "head", "--fail-if-any")
    assert res.returncode == 4
    assert res.stdout.splitlines()[0].startswith("layers.0.weight\t")
    assert res.stderr == ("check failed (--fail-if-any): 4 tensors selected: layers.0.weight, "
                          "layers.0.bias, layers.1.weight (+1 more)\n")
    quiet = run_cli("list", path, "--trainable", "-x", "head", "--fail-if-any", "-q")
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (4, "", "")
    ok("freeze", path, "layers", "-q")
    res = ok("list", path, "--trainable", "-x", "head", "--fail-if-any")
    assert res.stdout == "" and res.stderr == ""
    assert "4 a check found something" in ok("--help").stdout


LOCK_HOLDER = """\
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


@contextlib.contextmanager
def lock_held(path: Path, seconds: float, script: Path) -> Iterator[subprocess.Popen[str]]:
    holder = subprocess.Popen([sys.executable, str(script), str(path), str(seconds)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_lock_message_names_the_holder_and_wait_waits(sample: Sample, tmp_path: Path) -> None:
    path = sample("mlp.safetensors")
    before = path.read_bytes()
    other = tmp_path / "holder.py"
    other.write_text(LOCK_HOLDER, encoding="utf-8")
    with lock_held(path, 60, other) as holder:
        line = one_error_line(run_cli("freeze", path, "head"))
    assert line.startswith(f"error: {path} is locked by another process (pid {holder.pid}: ")
    assert "pass --wait SECONDS" in line
    # a holder that is a paramctl is named as one
    as_paramctl = tmp_path / "paramctl"
    as_paramctl.write_text(LOCK_HOLDER, encoding="utf-8")
    with lock_held(path, 60, as_paramctl) as holder:
        line = one_error_line(run_cli("freeze", path, "head", "--wait", "0.3"))
    assert line == (f"error: {path} is being rewritten by another paramctl process "
                    f"(pid {holder.pid}) (waited 0.3 s); try again when it has finished")
    assert path.read_bytes() == before
    # --wait outlasts a holder that lets go after a second
    with lock_held(path, 1.0, other):
        start = time.monotonic()
        res = ok("freeze", path, "head", "--wait", "5")
        waited = time.monotonic() - start
    assert res.stderr == f"wrote {path}\n"
    assert set(paramctl.frozen_names(path)) == {"head.weight", "head.bias"}
    assert waited > 0.5


def test_lora_ci_gate_from_the_readme(lora: Lora, tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    lines = [ln.split("#")[0].strip() for ln in readme.splitlines() if "lora.pt" in ln
             and ln.startswith("paramctl ")]
    freeze = next(ln for ln in lines if ln.startswith("paramctl freeze"))
    gate = next(ln for ln in lines if "--fail-if-any" in ln)
    shutil.copyfile(lora.path, tmp_path / "lora.pt")
    env = {**ENV, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    (tmp_path / "paramctl").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m paramctl "$@"\n')
    (tmp_path / "paramctl").chmod(0o755)

    def ci(script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", f"set -euo pipefail; {script}"], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120)

    res = ci(gate)  # peft's state dict records nothing frozen: the base weights would train
    assert res.returncode == 4, res.stderr
    assert "base_model.model.model.embed_tokens.weight" in res.stdout
    res = ci(f"{freeze}\n{gate}\necho gate passed")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "gate passed\n"


# -- 10. closed and full stdout ---------------------------------------------------------------
def test_closed_or_full_stdout_after_a_write_is_a_warning(sample: Sample, tmp_path: Path) -> None:
    path = sample("mlp.pt")
    cases = {
        "| head -1": None,
        "| true": "standard output was closed by the reader",
        "> /dev/full": "no space left on the device standard output writes to",
        ">&-": "standard output is closed",
    }
    for i, (redirect, why) in enumerate(cases.items()):
        action = "freeze" if i % 2 == 0 else "unfreeze"
        res = bash(f"{PARAMCTL} {action} {path} '*' -f tsv {redirect}", tmp_path)
        assert res.returncode == 0, (redirect, res.stderr)
        assert "Traceback" not in res.stderr and "error" not in res.stderr
        lines = res.stderr.splitlines()
        assert lines[0] == f"wrote {path}"
        if why is not None:
            assert lines[1:] == [f"warning: could not print the report ({why}); {path} was "
                                 "written"], redirect
        assert (paramctl.frozen_names(path) != []) == (action == "freeze")


def test_unprintable_listing_is_one_error_line(samples_dir: Path, tmp_path: Path) -> None:
    path = samples_dir / "llama.pt"
    for redirect, why in ((">&-", "standard output is closed"),
                          ("> /dev/full", "no space left on the device standard output writes "
                                          "to")):
        res = bash(f"{PARAMCTL} list {path} {redirect}", tmp_path)
        assert res.returncode == 1
        assert one_error_line(res) == f"error: cannot print the result: {why}"
    res = bash(f"{PARAMCTL} list {path} | true", tmp_path)
    assert res.returncode in (0, 141) and res.stderr == ""  # SIGPIPE, as Unix tools


# -- 11. read-only files, the Hugging Face cache ----------------------------------------------
def test_read_only_file_needs_force(sample: Sample, tmp_path: Path) -> None:
    path = sample("mlp.safetensors")
    path.chmod(0o444)
    before = sha(path)
    res = run_cli("freeze", path, "head")
    assert res.returncode == 1
    assert one_error_line(res) == (f"error: {path} is read-only; write elsewhere with -o OUT, "
                                   "or pass --force")
    assert sha(path) == before
    ok("freeze", path, "head", "--dry-run")
    ok("freeze", path, "head", "-o", tmp_path / "out.safetensors")
    ok("freeze", path, "head", "--force")
    assert set(paramctl.frozen_names(path)) == {"head.weight", "head.bias"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert "--force" in ok("init", "--help").stdout


def test_hugging_face_cache_file_is_never_rewritten_in_place(samples_dir: Path,
                                                             tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "0123abc").mkdir(parents=True)
    blob = repo / "blobs" / "9f86d081884c7d659a2feaa0c55ad015"
    shutil.copyfile(samples_dir / "llama.safetensors", blob)
    link = repo / "snapshots" / "0123abc" / "model.safetensors"
    link.symlink_to(Path("../../blobs") / blob.name)
    before = sha(blob)
    for args in (["freeze", link, "lm_head"], ["init", link, "lm_head=zeros"],
                 ["freeze", link, "lm_head", "--force"]):
        res = run_cli(*args)
        assert res.returncode == 1
        assert one_error_line(res) == (
            f"error: {link} is a file in the Hugging Face cache; writing it in place would "
            "corrupt the cache: pass -o OUT")
    assert sha(blob) == before and link.is_symlink()
    ok("freeze", link, "lm_head", "--dry-run")
    ok("freeze", link, "lm_head", "-o", tmp_path / "mine.safetensors")
    assert paramctl.frozen_names(tmp_path / "mine.safetensors") == ["lm_head.weight"]
    assert sha(blob) == before


# -- 12. apply names the rule -----------------------------------------------------------------
def test_apply_pattern_matching_nothing_names_the_rule(sample: Sample, tmp_path: Path) -> None:
    path = sample("mlp.pt")
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nfreeze = "layers"\n[[rule]]\ninit = "haed.*=zeros"\n',
                     encoding="utf-8")
    res = run_cli("apply", path, rules)
    assert res.returncode == 3
    assert one_error_line(res).startswith(
        f"error: {rules}: rule 2: pattern 'haed.*' matched no parameter; closest names: ")
    rules.write_text('[[rule]]\nfreeze = ["layers", "nope"]\n', encoding="utf-8")
    assert one_error_line(run_cli("apply", path, rules)).startswith(
        f"error: {rules}: rule 1: pattern 'nope' matched no parameter")
