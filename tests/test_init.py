"""`paramctl init`: the values it writes (statistics, not just shapes), seeding, rule order,
dtype handling, and errors that leave the file alone."""

from __future__ import annotations

import math
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import folder_state
from helpers import run_inproc as run
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import paramctl

CliFn = Callable[..., subprocess.CompletedProcess[str]]
N = 512


# -- helpers ---------------------------------------------------------------------------------
def tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return dict(load_file(str(path)))
    return dict(torch.load(path, weights_only=True))


def raw(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_unchanged(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor],
                     changed: set[str]) -> None:
    assert list(after) == list(before)
    for name, t in before.items():
        assert after[name].dtype == t.dtype and after[name].shape == t.shape, name
        if name not in changed:
            assert raw(after[name]) == raw(t), name


@pytest.fixture
def stats_file(tmp_path: Path) -> Path:
    """A real safetensors file with tensors large enough for statistics."""
    g = torch.Generator().manual_seed(1234)
    state = {
        "enc.w": torch.randn(N, N, generator=g) * 3 + 1,
        "enc.b": torch.randn(N, generator=g) * 3 + 1,
        "enc.wh": (torch.randn(N, N, generator=g) * 3 + 1).bfloat16(),
        "conv.w": torch.randn(64, 32, 3, 3, generator=g) * 3 + 1,
        "rect.w": torch.randn(256, 1024, generator=g) * 3 + 1,
        "count": torch.tensor([5], dtype=torch.int64),
    }
    path = tmp_path / "stats.safetensors"
    save_file(state, str(path), metadata={"format": "pt", "origin": "test"})
    return path


def init(capsys: pytest.CaptureFixture[str], path: Path, *args: object
         ) -> dict[str, torch.Tensor]:
    before = tensors(path)
    res = run(capsys, "init", path, *args)
    assert res.returncode == 0, res.stderr
    after = tensors(path)
    assert_unchanged(before, after, {line.split("\t")[0] for line in res.stdout.splitlines()})
    return after


# -- values ----------------------------------------------------------------------------------
def test_constants(stats_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = tensors(stats_file)
    res = run(capsys, "init", stats_file, "enc.w=zeros", "enc.b=ones", "rect.w=constant(val=0.5)",
              "enc.wh=constant(0.25)", "--seed", "1")
    assert res.returncode == 0, res.stderr
    assert sorted(line.split("\t")[0] for line in res.stdout.splitlines()) == \
        ["enc.b", "enc.w", "enc.wh", "rect.w"]
    after = tensors(stats_file)
    assert_unchanged(before, after, {"enc.w", "enc.b", "rect.w", "enc.wh"})
    assert torch.equal(after["enc.w"], torch.zeros(N, N))
    assert torch.equal(after["enc.b"], torch.ones(N))
    assert torch.equal(after["rect.w"], torch.full((256, 1024), 0.5))
    assert after["enc.wh"].dtype == torch.bfloat16
    assert torch.equal(after["enc.wh"], torch.full((N, N), 0.25, dtype=torch.bfloat16))
    with safe_open(str(stats_file), "pt") as fh:
        assert fh.metadata()["origin"] == "test"


@pytest.mark.parametrize("std", [0.02, 0.7])
def test_normal_statistics(stats_file: Path, capsys: pytest.CaptureFixture[str],
                           std: float) -> None:
    after = init(capsys, stats_file, f"enc.w=normal(std={std})", "enc.wh=normal(mean=1, std=0.5)",
                 "--seed", "3")
    w = after["enc.w"]
    assert w.dtype == torch.float32
    assert abs(w.std().item() - std) < 0.03 * std
    assert abs(w.mean().item()) < 0.01 * std
    h = after["enc.wh"]
    assert h.dtype == torch.bfloat16
    assert abs(h.float().std().item() - 0.5) < 0.03 * 0.5
    assert abs(h.float().mean().item() - 1) < 0.01


def test_uniform_and_trunc_normal_bounds(stats_file: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    after = init(capsys, stats_file, "enc.w=uniform(a=-0.3, b=0.7)",
                 "rect.w=trunc_normal(std=1.0, a=-0.5, b=0.5)", "--seed", "4")
    w = after["enc.w"]
    assert w.min().item() >= -0.3 and w.max().item() <= 0.7
    assert w.min().item() < -0.299 and w.max().item() > 0.699  # fills the whole range
    assert abs(w.mean().item() - 0.2) < 0.005
    assert abs(w.std().item() - 1 / math.sqrt(12)) < 0.01
    r = after["rect.w"]
    assert r.min().item() >= -0.5 and r.max().item() <= 0.5 and r.std().item() > 0.25


def _fans(shape: tuple[int, ...]) -> tuple[int, int]:
    fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))
    return fan_in, fan_out


@pytest.mark.parametrize(
    ("rule", "name", "bound"),
    [
        ("kaiming_uniform", "enc.w",
         lambda s: math.sqrt(3) * math.sqrt(2) / math.sqrt(_fans(s)[0])),
        ("kaiming_uniform(a=2.23, nonlinearity=leaky_relu)", "conv.w",
         lambda s: math.sqrt(3) * math.sqrt(2 / (1 + 2.23**2)) / math.sqrt(_fans(s)[0])),
        ("kaiming_uniform(mode=fan_out, nonlinearity=relu)", "rect.w",
         lambda s: math.sqrt(3) * math.sqrt(2) / math.sqrt(_fans(s)[1])),
        ("xavier_uniform", "rect.w", lambda s: math.sqrt(6 / sum(_fans(s)))),
        ("xavier_uniform(gain=2.0)", "conv.w", lambda s: 2 * math.sqrt(6 / sum(_fans(s)))),
    ],
    ids=["kaiming-default", "kaiming-leaky", "kaiming-fan-out", "xavier", "xavier-gain"],
)
def test_uniform_fan_bounds(stats_file: Path, capsys: pytest.CaptureFixture[str], rule: str,
                            name: str, bound: Callable[[tuple[int, ...]], float]) -> None:
    after = init(capsys, stats_file, f"{name}={rule}", "--seed", "5")
    t = after[name]
    limit = bound(tuple(t.shape))
    peak = t.abs().max().item()
    assert peak <= limit * (1 + 1e-6)
    assert peak >= limit * 0.98  # uniform over the whole interval, not something narrower
    assert abs(t.std().item() - limit / math.sqrt(3)) < 0.03 * limit / math.sqrt(3)


def test_normal_fan_std_and_orthogonal(stats_file: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    after = init(capsys, stats_file, "conv.w=kaiming_normal(mode=fan_out, nonlinearity=relu)",
                 "rect.w=xavier_normal", "enc.w=orthogonal", "--seed", "6")
    fan_out = _fans((64, 32, 3, 3))[1]
    want = math.sqrt(2 / fan_out)
    assert abs(after["conv.w"].std().item() - want) < 0.04 * want
    want = math.sqrt(2 / (1024 + 256))
    assert abs(after["rect.w"].std().item() - want) < 0.03 * want
    q = after["enc.w"].double()
    assert torch.allclose(q @ q.T, torch.eye(N, dtype=torch.float64), atol=1e-4)


def test_bfloat16_kaiming(stats_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    after = init(capsys, stats_file, "enc.wh=kaiming_uniform(nonlinearity=relu)", "--seed", "7")
    h = after["enc.wh"]
    assert h.dtype == torch.bfloat16
    with safe_open(str(stats_file), "pt") as fh:
        assert fh.get_slice("enc.wh").get_dtype() == "BF16"
    limit = math.sqrt(6 / N)
    assert h.float().abs().max().item() <= limit * (1 + 2**-8)
    assert abs(h.float().std().item() - limit / math.sqrt(3)) < 0.03 * limit / math.sqrt(3)


# -- seeding ---------------------------------------------------------------------------------
def test_same_seed_same_bytes_different_seed_differs(stats_file: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    copies = []
    for i in range(3):
        copy = tmp_path / f"copy{i}.safetensors"
        copy.write_bytes(stats_file.read_bytes())
        copies.append(copy)
    rules = ["enc.*=normal(std=0.1)", "conv.w=kaiming_uniform", "rect.w=uniform"]
    for copy, seed in zip(copies, ["11", "11", "12"], strict=True):
        assert run(capsys, "init", copy, *rules, "--seed", seed).returncode == 0
    assert copies[0].read_bytes() == copies[1].read_bytes()
    a, c = tensors(copies[0]), tensors(copies[2])
    for name in ("enc.w", "enc.b", "enc.wh", "conv.w", "rect.w"):
        assert not torch.equal(a[name], c[name]), name
    assert torch.equal(a["count"], c["count"])


def test_seed_is_per_tensor(stats_file: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    """An initialised tensor depends on (seed, name, rule) only: not on other rules, their
    order, or which pattern selected it."""
    alone = tmp_path / "alone.safetensors"
    crowd = tmp_path / "crowd.safetensors"
    alone.write_bytes(stats_file.read_bytes())
    crowd.write_bytes(stats_file.read_bytes())
    assert run(capsys, "init", alone, "enc.w=normal(std=0.1)", "--seed", "9").returncode == 0
    assert run(capsys, "init", crowd, "rect.w=uniform", "conv.w=xavier_normal",
               "e*.w=normal(std=0.1)", "enc.b=normal(std=0.1)", "--seed", "9").returncode == 0
    a, b = tensors(alone), tensors(crowd)
    assert raw(a["enc.w"]) == raw(b["enc.w"])
    assert not torch.equal(b["enc.w"], b["enc.b"].expand(N, N))
    # the rule is part of the seed: another std gives unrelated values, not a rescaling
    other = tmp_path / "other.safetensors"
    other.write_bytes(stats_file.read_bytes())
    assert run(capsys, "init", other, "enc.w=normal(std=0.2)", "--seed", "9").returncode == 0
    assert not torch.allclose(tensors(other)["enc.w"], 2 * a["enc.w"])


def test_seed_same_across_processes(sample: Callable[[str], Path], cli: CliFn,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    a = sample("mlp.pt")
    b = a.with_name("mlp2.pt")
    b.write_bytes(a.read_bytes())
    rules = ["layers.*.weight=kaiming_normal", "*.bias=normal(std=0.5)"]
    res = cli("init", a, *rules, "--seed", "21")
    assert res.returncode == 0, res.stderr
    assert run(capsys, "init", b, *rules, "--seed", "21").returncode == 0
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("model", ["mlp", "llama", "transformer"])
def test_same_rule_same_tensors_in_pt_and_safetensors(sample: Callable[[str], Path],
                                                      capsys: pytest.CaptureFixture[str],
                                                      model: str) -> None:
    pt, st = sample(f"{model}.pt"), sample(f"{model}.safetensors")
    before_pt, before_st = tensors(pt), tensors(st)
    rules = ["*.weight=normal(std=0.3)", "*.bias=uniform(a=-1, b=1)", "*norm*=ones"]
    for path in (pt, st):
        res = run(capsys, "init", path, *rules, "--seed", "11", "--allow-empty")
        assert res.returncode == 0, res.stderr
    a, b = tensors(pt), tensors(st)
    changed = {n for n in a if n.endswith((".weight", ".bias"))}
    assert changed
    assert_unchanged(before_pt, a, changed)
    assert_unchanged(before_st, b, changed)
    for name in b:
        assert raw(a[name]) == raw(b[name]), name
    for name in changed:
        assert not torch.equal(a[name], before_pt[name]) or "norm" in name
        if "norm" in name and name.endswith(".weight"):
            assert torch.equal(a[name], torch.ones_like(a[name]))


def test_tied_tensor_initialised_once_through_either_name(sample: Callable[[str], Path],
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    a = sample("transformer.pt")
    b = a.with_name("t2.pt")
    b.write_bytes(a.read_bytes())
    res = run(capsys, "init", a, "embed=normal(std=0.5)", "--seed", "2")
    assert res.returncode == 0, res.stderr
    assert {r.split("\t")[0] for r in res.stdout.splitlines()} == {"embed.weight",
                                                                   "lm_head.weight"}
    assert run(capsys, "init", b, "lm_head=normal(std=0.5)", "--seed", "2").returncode == 0
    ta, tb = tensors(a), tensors(b)
    assert torch.equal(ta["embed.weight"], ta["lm_head.weight"])
    assert raw(ta["embed.weight"]) == raw(tb["embed.weight"]) == raw(tb["lm_head.weight"])


# -- rule order ------------------------------------------------------------------------------
def test_last_rule_wins(stats_file: Path, tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    after = init(capsys, stats_file, "enc.*=zeros", "enc.b=ones")
    assert torch.equal(after["enc.b"], torch.ones(N))
    assert torch.equal(after["enc.w"], torch.zeros(N, N))
    assert torch.equal(after["enc.wh"].float(), torch.zeros(N, N))
    after = init(capsys, stats_file, "enc.b=ones", "enc.*=zeros")
    assert torch.equal(after["enc.b"], torch.zeros(N))

    # the overriding rule gives exactly what it gives alone
    alone = tmp_path / "alone.safetensors"
    alone.write_bytes(stats_file.read_bytes())
    after = init(capsys, stats_file, "*.w=normal(std=1)", "conv.w=uniform(a=0, b=1)",
                 "--seed", "3")
    ref = init(capsys, alone, "conv.w=uniform(a=0, b=1)", "--seed", "3")
    assert raw(after["conv.w"]) == raw(ref["conv.w"])
    assert after["conv.w"].min().item() >= 0


def test_dry_run_prints_plan_and_writes_nothing(stats_file: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    stamp = folder_state(tmp_path)
    res = run(capsys, "init", stats_file, "enc.b=zeros", "conv.w=kaiming_uniform(a=1)",
              "--seed", "1", "--dry-run")
    assert res.returncode == 0, res.stderr
    rows = [r.split("\t") for r in res.stdout.splitlines()]
    assert sorted(r[:2] for r in rows) == [["conv.w", "kaiming_uniform(a=1)"], ["enc.b", "zeros()"]]
    res = run(capsys, "init", stats_file, "*.w=ones", "--dry-run", "-f", "table",
              "-o", tmp_path / "out.safetensors")
    assert res.returncode == 0, res.stderr
    assert "rect.w" in res.stdout and "ones" in res.stdout and "dry run" in res.stdout
    assert folder_state(tmp_path) == stamp


# -- errors ----------------------------------------------------------------------------------
ERRORS = [
    # (file, rule, exit code, fragments the one-line message must hold)
    ("mlp.pt", "*.bias=foo", 2,
     ["unknown init function", "'foo'", "kaiming_uniform", "xavier_normal", "zeros", "eye"]),
    ("mlp.pt", "*.bias=normal(mean=0, bogus=1)", 2, ["bogus", "mean", "std"]),
    ("mlp.safetensors", "head.weight=normal(std=)", 2, ["normal(std=)"]),
    ("mlp.pt", "head.weight=kaiming_uniform(nonlinearity=foo)", 2, ["nonlinearity", "foo"]),
    ("mlp.pt", "head.weight=normal(std=-1)", 2, ["std"]),
    ("mlp.safetensors", "head.weight=uniform(a=1, b=0)", 2, ["uniform"]),
    ("mlp.pt", "head.weight=constant(val=[1])", 2, ["constant", "val"]),
    ("mlp.pt", "head.weight=constant", 2, ["val"]),
    ("mlp.pt", "zeros", 2, ["PATTERN=FN"]),
    ("cnn.pt", "*num_batches_tracked=zeros", 1, ["features.1.num_batches_tracked", "int64"]),
    ("cnn.safetensors", "features.4=normal", 1, ["features.4.num_batches_tracked"]),
    ("mlp.pt", "*.bias=xavier_uniform", 1, ["layers.0.bias"]),
    ("mlp.safetensors", "*=kaiming_normal", 1, ["bias"]),
    ("cnn.pt", "features.0.weight=eye", 1, ["features.0.weight"]),
    ("cnn.safetensors", "classifier.bias=dirac", 1, ["classifier.bias"]),
    ("mlp.pt", "decoder.*=zeros", 3, ["decoder.*"]),
]


@pytest.mark.parametrize(("name", "rule", "code", "fragments"), ERRORS,
                         ids=[f"{e[0]}:{e[1]}" for e in ERRORS])
def test_init_errors_leave_file_alone(sample: Callable[[str], Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str], name: str, rule: str,
                                      code: int, fragments: list[str]) -> None:
    path = sample(name)
    stamp = folder_state(tmp_path)
    res = run(capsys, "init", path, "*.bias=zeros", rule, "--seed", "1")
    assert res.returncode == code, res.stderr
    assert res.stdout == ""
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    for fragment in fragments:
        assert fragment in res.stderr, (fragment, res.stderr)
    if "nonlinearity=foo" in rule:  # says what is wrong with the value, not something else
        assert "fan" not in res.stderr.lower(), res.stderr
    assert folder_state(tmp_path) == stamp
    res = run(capsys, "init", path, rule, "-o", tmp_path / f"out{path.suffix}")
    assert res.returncode == code
    assert folder_state(tmp_path) == stamp


def test_init_errors_in_subprocess(sample: Callable[[str], Path], tmp_path: Path,
                                   cli: CliFn) -> None:
    path = sample("cnn.pt")
    stamp = folder_state(tmp_path)
    res = cli("init", path, "features.1=zeros")
    assert res.returncode == 1
    # the first tensor of features.1 that cannot be initialised: a buffer, by its name
    assert res.stderr.startswith("error: cannot initialise buffer features.1.running_mean")
    assert "Traceback" not in res.stderr
    res = cli("init", path, "features.0.weight=nope(x=1)")
    assert res.returncode == 2 and "valid:" in res.stderr
    assert folder_state(tmp_path) == stamp


def test_init_through_api_matches_cli(sample: Callable[[str], Path],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = sample("mlp.safetensors")
    res = run(capsys, "init", path, "layers.*.weight=xavier_normal", "head=zeros",
              "--seed", "8")
    assert res.returncode == 0, res.stderr
    from sample_models.mlp import MLP

    model = MLP()
    paramctl.init_params(model, ["layers.*.weight=xavier_normal", "head=zeros"], seed=8)
    on_disk = tensors(path)
    for name, p in model.named_parameters():
        if name.startswith("layers.") and name.endswith(".bias"):
            continue
        assert raw(p) == raw(on_disk[name]), name


def test_dirac_groups_on_tensors_it_fits(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """`dirac(groups=G)` is valid wherever out_channels is divisible by G."""
    path = tmp_path / "conv.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({"small": torch.randn(96, 32, 3, 3, generator=g),
               "big": torch.randn(384, 256, 3, 3, generator=g)}, str(path))
    res = run(capsys, "init", path, "small=dirac(groups=3)", "big=dirac(groups=32)")
    assert res.returncode == 0, res.stderr
    after = tensors(path)
    for name, groups in (("small", 3), ("big", 32)):
        want = torch.empty_like(after[name])
        torch.nn.init.dirac_(want, groups=groups)
        assert torch.equal(after[name], want), name


def test_non_contiguous_tensor_same_values_as_contiguous(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    """A transposed tensor in a .pt gets the same values as the same tensor stored
    contiguously in a .safetensors: the result depends on (seed, name, rule), not layout."""
    g = torch.Generator().manual_seed(0)
    state = {"t.weight": torch.randn(5, 7, generator=g).t(),
             "h.weight": torch.randn(64, 32, generator=g).half().t()}
    assert not state["t.weight"].is_contiguous()
    pt, st = tmp_path / "nc.pt", tmp_path / "nc.safetensors"
    torch.save(state, pt)
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    rules = ["t.weight=normal(std=1)", "h.weight=kaiming_uniform"]
    for path in (pt, st):
        res = run(capsys, "init", path, *rules, "--seed", "1")
        assert res.returncode == 0, res.stderr
    a, b = tensors(pt), tensors(st)
    assert a["t.weight"].stride() == state["t.weight"].stride()  # layout kept
    for name in state:
        assert a[name].dtype == b[name].dtype
        assert torch.equal(a[name], b[name]), name
