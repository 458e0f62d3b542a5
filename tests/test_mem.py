"""``paramctl mem``: the training-memory estimate agrees with DESIGN.md's table, worked out
here independently from torch's own ``named_parameters()`` / ``named_buffers()``.

The model under test mixes what the arithmetic must tell apart: a frozen conv, a frozen
bias, a tied embedding/head pair, a bf16 layer (the precision, not the stored dtype, sets the
bytes), a 3-D and a 0-D parameter (Adafactor's factoring), float buffers (BatchNorm) and an
integer buffer. It is read three ways: as a module path (buffers known from the module), as
``torch.save(state_dict(keep_vars=True))`` (frozen flags in the file) and as a plain state
dict frozen by ``paramctl freeze``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from helpers import REPO, one_error_line, run_cli, run_inproc
from torch import nn

import paramctl
from paramctl.cli.mem_cmd import EXAMPLES
from paramctl.errors import UsageError
from paramctl.memory import OPTIMIZERS, PRECISIONS, estimate
from paramctl.render import human_bytes
from sample_models.llama import Llama

Capsys = pytest.CaptureFixture[str]

# DESIGN.md's table, transcribed: bytes per parameter for (weights, gradients, master copy).
PRECISION_BYTES = {"fp32": (4, 4, 0), "bf16": (2, 2, 0), "fp16": (2, 2, 0),
                   "bf16-mixed": (2, 2, 4), "fp16-mixed": (2, 2, 4)}
OPTIMIZER_BYTES = {"adamw": 8, "adam": 8, "sgd": 0, "sgd-momentum": 4, "lion": 4,
                   "adamw-8bit": 2}
SHARDS = 3  # does not divide every component: exercises the rounding up

NET_SOURCE = textwrap.dedent('''
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, float_buffers: bool) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.conv = nn.Conv2d(3, 8, 3)
            if float_buffers:
                self.bn = nn.BatchNorm2d(8)  # running_mean/var and an int64 counter
            self.cube = nn.Parameter(torch.randn(3, 4, 5))
            self.scale = nn.Parameter(torch.tensor(1.0))
            self.fc = nn.Linear(16, 24)
            self.half = nn.Linear(24, 16).to(torch.bfloat16)
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.embed.weight
            self.register_buffer("steps", torch.zeros(4, dtype=torch.int64))


    def build(float_buffers: bool = True, frozen: bool = True) -> Net:
        torch.manual_seed(0)
        model = Net(float_buffers)
        if frozen:
            model.conv.requires_grad_(False)
            model.fc.bias.requires_grad_(False)
        return model
''')


def load_file_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"mem_test_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- the expectation, from torch alone ---------------------------------------------------------
def adafactor_state(shape: torch.Size) -> int:
    if len(shape) < 2:
        return 4 * math.prod(shape)
    return 4 * (shape[-2] + shape[-1]) * math.prod(shape[:-2])


def expected(model: nn.Module, source: str, optimizer: str, precision: str, shards: int,
             zero: int) -> dict[str, Any]:
    w, g, m = PRECISION_BYTES[precision]
    weights = grads = master = state = 0
    trainable = frozen = 0
    for _, p in model.named_parameters():  # yields a tied tensor once
        weights += w * p.numel()
        if p.requires_grad:
            trainable += p.numel()
            grads += g * p.numel()
            master += m * p.numel()
            state += (adafactor_state(p.shape) if optimizer == "adafactor"
                      else OPTIMIZER_BYTES[optimizer] * p.numel())
        else:
            frozen += p.numel()
    buffers = list(model.named_buffers())
    stored = sum(b.numel() * b.element_size() for _, b in buffers)
    total_numel = trainable + frozen + sum(b.numel() for _, b in buffers)

    def up(n: int, stage: int) -> int:  # ceil(n / shards) from that ZeRO stage on
        return -(-n // shards) if shards > 1 and zero >= stage else n

    whole = {"weights": weights + stored, "gradients": grads, "master": master,
             "optimizer": state}
    device = {"weights": up(weights, 3) + stored, "gradients": up(grads, 2),
              "master": up(master, 1), "optimizer": up(state, 1)}
    return {
        "source": source, "precision": precision, "optimizer": optimizer, "shards": shards,
        "zero": zero, "params": {"total": total_numel, "trainable": trainable, "frozen": frozen},
        "bytes": {**whole, "total": sum(whole.values())},
        "per_device": {**device, "total": sum(device.values())},
    }


# -- fixtures ----------------------------------------------------------------------------------
class Net:
    """The test model three ways, and the torch models the expectation is computed from."""

    def __init__(self, folder: Path) -> None:
        self.py = folder / "net.py"
        self.py.write_text(NET_SOURCE, encoding="utf-8")
        code = load_file_module(self.py)
        self.module_spec = f"{self.py}:build"
        self.with_buffers = code.build(float_buffers=True)
        # A file tells buffers from parameters by dtype only (integer tensors); the
        # file variants hold no float buffers, so both readings agree with torch exactly.
        self.no_float_buffers = code.build(float_buffers=False)
        self.keep_vars_pt = folder / "keep_vars.pt"
        torch.save(self.no_float_buffers.state_dict(keep_vars=True), self.keep_vars_pt)
        self.freeze_pt = folder / "frozen_by_paramctl.pt"
        torch.save(code.build(float_buffers=False, frozen=False).state_dict(), self.freeze_pt)
        res = run_cli("freeze", self.freeze_pt, "conv", "fc.bias", "-q")
        assert res.returncode == 0, res.stderr

    def sources(self) -> list[tuple[str, nn.Module]]:
        return [(self.module_spec, self.with_buffers),
                (str(self.keep_vars_pt), self.no_float_buffers),
                (str(self.freeze_pt), self.no_float_buffers)]


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Net:
    return Net(tmp_path_factory.mktemp("mem"))


def mem_json(capsys: Capsys, *args: object) -> dict[str, Any]:
    res = run_inproc(capsys, "mem", *args, "-f", "json")
    assert res.returncode == 0, res.stderr
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


# -- the formulas, every optimizer x precision x ZeRO stage ------------------------------------
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_choice_matches_torch(capsys: Capsys, net: Net, optimizer: str, precision: str,
                                    zero: int) -> None:
    for source, model in net.sources():
        doc = mem_json(capsys, source, "--optimizer", optimizer, "--precision", precision,
                       "--shards", SHARDS, "--zero", zero)
        assert doc == expected(model, source, optimizer, precision, SHARDS, zero), source


def test_the_model_exercises_what_it_should(net: Net) -> None:
    params = dict(net.with_buffers.named_parameters())
    assert not params["conv.weight"].requires_grad and not params["fc.bias"].requires_grad
    assert "head.weight" not in params  # tied to embed.weight, yielded once
    assert params["half.weight"].dtype == torch.bfloat16
    assert {p.dim() for p in params.values()} >= {0, 1, 2, 3, 4}
    buffers = dict(net.with_buffers.named_buffers())
    assert {b.dtype for b in buffers.values()} == {torch.float32, torch.int64}


def test_fully_trainable_fp32_adamw_is_16_bytes_a_parameter(capsys: Capsys,
                                                            samples_dir: Path) -> None:
    for name in ("transformer.pt", "llama.safetensors"):  # transformer ties embed/lm_head
        doc = mem_json(capsys, samples_dir / name)
        numel = doc["params"]["total"]
        assert doc["params"]["trainable"] == numel
        assert doc["bytes"] == {"weights": 4 * numel, "gradients": 4 * numel, "master": 0,
                                "optimizer": 8 * numel, "total": 16 * numel}
    assert mem_json(capsys, samples_dir / "transformer.pt")["params"]["total"] == 27_520


def test_tied_weights_counted_once(capsys: Capsys) -> None:
    model = Llama(tie_embeddings=True)
    numel = sum(p.numel() for p in model.parameters())
    untied = sum(p.numel() for p in Llama().parameters())
    assert untied - numel == 128 * 64  # the head, counted once when tied
    doc = mem_json(capsys, "sample_models.llama:Llama", "--arg", "tie_embeddings=True")
    assert doc["bytes"]["total"] == 16 * numel


def test_buffers_and_integer_tensors_count_in_weights_only(capsys: Capsys) -> None:
    from sample_models.cnn import SmallCNN

    model = SmallCNN()
    numel = sum(p.numel() for p in model.parameters())
    stored = sum(b.numel() * b.element_size() for b in model.buffers())
    assert {b.dtype for b in model.buffers()} == {torch.float32, torch.int64}
    doc = mem_json(capsys, "sample_models.cnn:SmallCNN", "--precision", "bf16-mixed",
                   "--shards", 2, "--zero", 3)
    assert doc["bytes"] == {"weights": 2 * numel + stored, "gradients": 2 * numel,
                            "master": 4 * numel, "optimizer": 8 * numel,
                            "total": 16 * numel + stored}
    # ZeRO-3 shards parameters; buffers stay whole on every device
    assert doc["per_device"]["weights"] == numel + stored


def test_zero_without_shards_and_shards_without_zero(capsys: Capsys, net: Net) -> None:
    alone = mem_json(capsys, net.keep_vars_pt, "--zero", 3)
    assert alone["per_device"] == alone["bytes"]
    ddp = mem_json(capsys, net.keep_vars_pt, "--shards", 8)
    assert ddp["per_device"] == ddp["bytes"]
    assert ddp["bytes"] == alone["bytes"]


def test_freeze_lowers_the_estimate(capsys: Capsys, sample: Any) -> None:
    path = sample("llama.safetensors")
    before = mem_json(capsys, path)
    layer0 = sum(p.numel() for n, p in Llama().named_parameters()
                 if n.startswith("model.layers.0."))
    res = run_cli("freeze", path, "model.layers.0", "-q")
    assert res.returncode == 0, res.stderr
    after = mem_json(capsys, path)
    assert after["params"]["frozen"] == layer0
    assert after["params"]["trainable"] == before["params"]["trainable"] - layer0
    # a frozen fp32 parameter keeps its 4 bytes of weights and drops 4 + 8
    assert before["bytes"]["total"] - after["bytes"]["total"] == 12 * layer0


# -- accelerate's "Training using Adam" figure -------------------------------------------------
def accelerate_training_bytes(model: nn.Module) -> int:
    """What ``accelerate estimate-memory`` prints as "Training using Adam" for float32."""
    estimate_mod = pytest.importorskip("accelerate.commands.estimate")
    size, _ = estimate_mod.calculate_maximum_sizes(model)
    return int(max(estimate_mod.estimate_training_usage(size, "float32").values()))


@pytest.mark.parametrize("tie", [False, True])
def test_matches_accelerate_on_a_model_without_buffers(capsys: Capsys, tie: bool) -> None:
    model = Llama(tie_embeddings=tie)
    assert not list(model.buffers())
    doc = mem_json(capsys, "sample_models.llama:Llama", "--arg", f"tie_embeddings={tie}")
    assert doc["bytes"]["total"] == accelerate_training_bytes(model)


def test_accelerate_also_multiplies_buffers(capsys: Capsys, tmp_path: Path) -> None:
    """On a Hugging Face Llama (rotary ``inv_freq`` buffers) accelerate's rule is 4 x the
    whole fp32 size, buffers included; paramctl counts a buffer once. The figures differ by
    exactly 3 x the buffer bytes."""
    pytest.importorskip("transformers")
    factory = tmp_path / "tiny_hf.py"
    factory.write_text(textwrap.dedent('''
        from transformers import LlamaConfig, LlamaForCausalLM


        def tiny_llama():
            return LlamaForCausalLM(LlamaConfig(
                vocab_size=128, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2))
    '''), encoding="utf-8")
    model = load_file_module(factory).tiny_llama()
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    assert buffer_bytes > 0
    doc = mem_json(capsys, f"{factory}:tiny_llama")
    numel = sum(p.numel() for p in model.parameters())
    assert doc["bytes"]["total"] == 16 * numel + buffer_bytes
    assert accelerate_training_bytes(model) == doc["bytes"]["total"] + 3 * buffer_bytes


# -- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "message"), [
    (["--optimizer", "adamx"], "error: unknown optimizer 'adamx'; choose one of adamw, adam, "
     "sgd, sgd-momentum, lion, adamw-8bit, adafactor"),
    (["--precision", "fp8"], "error: unknown precision 'fp8'; choose one of fp32, bf16, fp16, "
     "bf16-mixed, fp16-mixed"),
    (["--zero", "4"], "error: unknown ZeRO stage 4; choose one of 0, 1, 2, 3"),
    (["--shards", "0"], "error: shards must be a number of devices, 1 or more (got 0)"),
    (["-f", "tsv"], "error: unknown format 'tsv'; choose one of table, json"),
])
def test_invalid_choices_exit_2_with_the_list(capsys: Capsys, net: Net, args: list[str],
                                              message: str) -> None:
    res = run_inproc(capsys, "mem", net.keep_vars_pt, *args)
    assert res.returncode == 2
    assert one_error_line(res) == message
    assert res.stdout == ""


def test_choices_are_checked_before_the_source_is_opened(capsys: Capsys) -> None:
    res = run_inproc(capsys, "mem", "no/such/file.pt", "--optimizer", "adamx")
    assert res.returncode == 2
    assert "unknown optimizer" in one_error_line(res)


def test_library_raises_usage_error() -> None:
    with pytest.raises(UsageError, match="choose one of adamw") as info:
        estimate([], optimizer="adamx")
    assert info.value.exit_code == 2
    with pytest.raises(UsageError, match="ZeRO"):
        paramctl.mem("no/such/file.pt", zero=5)


def test_case_of_names_does_not_matter(capsys: Capsys, net: Net) -> None:
    doc = mem_json(capsys, net.keep_vars_pt, "--optimizer", "AdamW", "--precision", "BF16-Mixed")
    assert (doc["optimizer"], doc["precision"]) == ("adamw", "bf16-mixed")


# -- output ------------------------------------------------------------------------------------
def test_table(capsys: Capsys, net: Net) -> None:
    doc = mem_json(capsys, net.keep_vars_pt, "--precision", "bf16-mixed", "--shards", 4,
                   "--zero", 2)
    res = run_inproc(capsys, "mem", net.keep_vars_pt, "--precision", "bf16-mixed",
                     "--shards", 4, "--zero", 2)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == f"{net.keep_vars_pt}: training with adamw, bf16-mixed, 4 devices, " \
                       "ZeRO stage 2"
    assert lines[2].split() == ["component", "total", "per", "device"]
    labels = {"weights": "weights", "gradients": "gradients", "master copy": "master",
              "optimizer state": "optimizer", "total": "total"}
    for line, (label, key) in zip(lines[3:8], labels.items(), strict=True):
        assert line.startswith(label)
        assert line.endswith(human_bytes(doc["bytes"][key]).rjust(10) + "  "
                             + human_bytes(doc["per_device"][key]).rjust(10))
    p = doc["params"]
    assert lines[9] == (f"params {p['total']:,} · trainable {p['trainable']:,} "
                        f"({100 * p['trainable'] / p['total']:.1f}%) · frozen {p['frozen']:,} "
                        f"({100 * p['frozen'] / p['total']:.1f}%)")
    assert lines[10] == ("activations are not included (they depend on batch size and "
                         "sequence length)")
    assert len(lines) == 11
    single = run_inproc(capsys, "mem", net.keep_vars_pt).stdout.splitlines()
    assert single[2].split() == ["component", "total"]  # no per-device column


def test_api_matches_cli(capsys: Capsys, net: Net) -> None:
    est = paramctl.mem(str(net.keep_vars_pt), optimizer="lion", precision="fp16-mixed",
                       shards=2, zero=1)
    assert isinstance(est, paramctl.MemEstimate)
    assert est.to_json() == mem_json(capsys, net.keep_vars_pt, "--optimizer", "lion",
                                     "--precision", "fp16-mixed", "--shards", 2, "--zero", 1)


def test_mem_reads_a_file_without_torch(samples_dir: Path) -> None:
    script = (
        "import os, sys, runpy\n"
        # paramctl leaves with os._exit (no interpreter teardown); the probe has more to do.
        "def _exit(code):\n"
        "    raise SystemExit(code)\n"
        "os._exit = _exit\n"
        f"sys.argv = ['paramctl', 'mem', {str(samples_dir / 'llama.safetensors')!r}]\n"
        "try:\n"
        "    runpy.run_module('paramctl', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'rich'))\n"
        "sys.stderr.write('RESULT %r %r\\n' % (code, heavy[:5]))\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                         timeout=60)
    assert res.stderr.strip().splitlines()[-1] == "RESULT 0 []", res.stderr
    assert "training with adamw, fp32" in res.stdout


# -- the list footer ---------------------------------------------------------------------------
def test_list_footer_line(capsys: Capsys, net: Net) -> None:
    exp = expected(net.no_float_buffers, "", "adamw", "fp32", 1, 0)["bytes"]["total"]
    line = f"training AdamW fp32: {human_bytes(exp)} (with this frozen set)"
    res = run_inproc(capsys, "list", net.keep_vars_pt, "-f", "table", "--width", "120")
    assert res.stdout.splitlines()[-1] == line
    for fmt in ("tsv", "json", "jsonl", "names"):
        assert "training AdamW" not in run_inproc(capsys, "list", net.keep_vars_pt,
                                                  "-f", fmt).stdout
    assert "training AdamW" not in run_inproc(capsys, "list", net.keep_vars_pt, "-f", "table",
                                              "--no-headers").stdout


# -- help --------------------------------------------------------------------------------------
def test_help_examples_run_as_written(capsys: Capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    commands = [shlex.split(line) for line in EXAMPLES.splitlines()
                if line.strip().startswith("paramctl mem ")]
    assert len(commands) == 3
    outputs = []
    for argv in commands:
        res = run_inproc(capsys, *argv[1:])
        assert res.returncode == 0, (argv, res.stderr)
        outputs.append(res.stdout)
    assert "training with adamw, bf16-mixed" in outputs[0]
    # Llama-2-70B's shapes: 68,976,648,192 parameters, 16 bytes each, split 8 ways
    assert "params 68,976,648,192 · trainable 68,976,648,192" in outputs[1]
    assert outputs[1].splitlines()[7].split()[1:] == ["1.00", "TiB", "128.48", "GiB"]
    assert json.loads(outputs[2])["optimizer"] == "sgd-momentum"
