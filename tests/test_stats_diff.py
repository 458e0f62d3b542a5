"""stats and diff on real checkpoints, every figure checked against torch in float64."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, one_error_line, run_cli
from safetensors.torch import load_file, save_file

FIELDS = ("min", "max", "mean", "std", "l2", "zeros", "nan", "inf")


def torch_stats(t: torch.Tensor) -> dict[str, float | int | None]:
    x = t.detach().reshape(-1).to(torch.float64)
    finite = x[torch.isfinite(x)]
    out: dict[str, float | int | None] = {
        "zeros": int((x == 0).sum()), "nan": int(torch.isnan(x).sum()),
        "inf": int(torch.isinf(x).sum())}
    if finite.numel() == 0:
        out.update(min=None, max=None, mean=None, std=None, l2=None)
    else:
        out.update(min=float(finite.min()), max=float(finite.max()), mean=float(finite.mean()),
                   std=float(finite.std(unbiased=False)), l2=float(finite.norm()))
    return out


def close(a: float | int | None, b: float | int | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


@pytest.fixture(scope="module")
def hf_bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformers model saved by save_pretrained in bfloat16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    folder = tmp_path_factory.mktemp("hf")
    model.save_pretrained(folder)
    return folder / "model.safetensors"


@pytest.fixture(scope="module")
def nonfinite_pt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    sd = {"a.weight": torch.randn(16, 8), "b.weight": torch.randn(7, 3).half(),
          "c.bias": torch.zeros(5), "steps": torch.tensor(7),
          "mask": torch.tensor([1, 0, 1]).bool(), "empty": torch.empty(0, 4)}
    sd["a.weight"][0, 0] = float("nan")
    sd["a.weight"][1, 1] = float("inf")
    sd["b.weight"][2, 2] = float("-inf")
    path = tmp_path_factory.mktemp("nf") / "nonfinite.pt"
    torch.save(sd, path)
    return path


def test_stats_bf16_transformers_model_matches_torch(hf_bf16: Path) -> None:
    res = run_cli("stats", hf_bf16, "-f", "json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    tensors = load_file(hf_bf16)
    assert {t["name"] for t in doc["tensors"]} == set(tensors)
    for row in doc["tensors"]:
        want = torch_stats(tensors[row["name"]])
        assert row["dtype"] == "bfloat16"
        assert row["numel"] == tensors[row["name"]].numel()
        for f in FIELDS:
            assert close(row[f], want[f]), (row["name"], f, row[f], want[f])
    assert doc["totals"]["tensors"] == len(tensors)
    assert doc["totals"]["nonfinite_tensors"] == 0


def test_stats_nonfinite_pt_every_dtype_and_check(nonfinite_pt: Path) -> None:
    res = run_cli("stats", nonfinite_pt, "-f", "json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    tensors = torch.load(nonfinite_pt, weights_only=True)
    for row in doc["tensors"]:
        want = torch_stats(tensors[row["name"]])
        for f in FIELDS:
            assert close(row[f], want[f]), (row["name"], f, row[f], want[f])
    by = {r["name"]: r for r in doc["tensors"]}
    assert by["empty"]["min"] is None and by["empty"]["numel"] == 0
    assert by["mask"]["max"] == 1.0 and by["mask"]["zeros"] == 1
    assert doc["totals"] == {"tensors": 6, "numel": 16 * 8 + 21 + 5 + 1 + 3,
                             "nan": 1, "inf": 2, "nonfinite_tensors": 2}
    check = run_cli("stats", nonfinite_pt, "--check", "-q")
    assert check.returncode == 4
    line = one_error_line(check)
    assert "a.weight" in line and "b.weight" in line
    assert run_cli("stats", nonfinite_pt, "c.bias", "--check").returncode == 0


def test_stats_tsv_has_twelve_columns(nonfinite_pt: Path) -> None:
    res = run_cli("stats", nonfinite_pt, "a.weight")
    assert res.returncode == 0
    cells = res.stdout.rstrip("\n").split("\t")
    assert len(cells) == 12 and cells[:4] == ["a.weight", "16x8", "float32", "128"]
    assert cells[10:] == ["1", "1"]


def test_stats_table_footer(nonfinite_pt: Path) -> None:
    res = run_cli("stats", nonfinite_pt, "-f", "table")
    assert res.returncode == 0
    assert res.stdout.splitlines()[-1] == ("6 tensors, 158 values; nan 1, inf 2 in 2 "
                                           "tensors")


def test_stats_processes_equal_single(hf_bf16: Path) -> None:
    one = run_cli("stats", hf_bf16, "-f", "json", "--jobs", "1")
    two = run_cli("stats", hf_bf16, "-f", "json", "--jobs", "2")
    assert one.returncode == two.returncode == 0
    assert one.stdout == two.stdout


def test_stats_strided_pt_view(tmp_path: Path) -> None:
    base = torch.randn(6, 4)
    sd = {"t": base.t(), "row": base[2]}
    path = tmp_path / "views.pt"
    torch.save(sd, path)
    doc = json.loads(run_cli("stats", path, "-f", "json").stdout)
    for row in doc["tensors"]:
        want = torch_stats(sd[row["name"]])
        for f in FIELDS:
            assert close(row[f], want[f])


def test_stats_truncated_file_is_one_line(tmp_path: Path, hf_bf16: Path) -> None:
    bad = tmp_path / "cut.safetensors"
    data = hf_bf16.read_bytes()
    bad.write_bytes(data[: len(data) - 10])
    res = run_cli("stats", bad)
    assert res.returncode == 1
    one_error_line(res)


# -- diff ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict, dict]:
    torch.manual_seed(2)
    folder = tmp_path_factory.mktemp("pair")
    a = {"same.w": torch.randn(4, 4), "changed.w": torch.randn(8, 3),
         "dtype.w": torch.randn(5), "shape.w": torch.randn(2, 3),
         "removed.w": torch.randn(3), "zero.w": torch.zeros(4), "flag.w": torch.randn(2)}
    b = {k: v.clone() for k, v in a.items() if k != "removed.w"}
    b["changed.w"] = a["changed.w"] + 0.01 * torch.randn(8, 3)
    b["dtype.w"] = a["dtype.w"].to(torch.bfloat16)
    b["shape.w"] = torch.randn(3, 2)
    b["added.w"] = torch.randn(6)
    b["zero.w"] = torch.ones(4)
    save_file(a, folder / "a.safetensors")
    torch.save({**{k: v for k, v in b.items() if k != "flag.w"},
                "flag.w": torch.nn.Parameter(b["flag.w"], requires_grad=False)},
               folder / "b.pt")
    return folder / "a.safetensors", folder / "b.pt", a, b


def metrics(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float | None, float | None]:
    x, y = a.double().reshape(-1), b.double().reshape(-1)
    na, nb = float(x.norm()), float(y.norm())
    return (float((x - y).abs().max()), float((x - y).norm()) / na if na else None,
            float(x @ y) / (na * nb) if na and nb else None)


def test_diff_every_status_and_metric_across_formats(pair: tuple[Path, Path, dict, dict]
                                                     ) -> None:
    pa, pb, a, b = pair
    res = run_cli("diff", pa, pb, "-f", "json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    rows = {r["name"]: r for r in doc["tensors"]}
    assert {n: r["status"] for n, r in rows.items()} == {
        "same.w": "same", "changed.w": "changed", "dtype.w": "dtype", "shape.w": "shape",
        "removed.w": "removed", "zero.w": "changed", "flag.w": "same", "added.w": "added"}
    for name in ("changed.w", "dtype.w", "zero.w"):
        want = metrics(a[name], b[name])
        got = (rows[name]["max_abs"], rows[name]["rel_l2"], rows[name]["cosine"])
        assert all(close(g, w) for g, w in zip(got, want, strict=True)), (name, got, want)
    assert rows["zero.w"]["rel_l2"] is None and rows["zero.w"]["cosine"] is None
    assert rows["same.w"]["max_abs"] is None
    assert rows["flag.w"]["requires_grad_a"] is True
    assert rows["flag.w"]["requires_grad_b"] is False
    assert rows["added.w"]["shape_a"] is None and rows["added.w"]["shape_b"] == [6]
    assert set(rows["same.w"]) == {"name", "status", "shape_a", "shape_b", "dtype_a", "dtype_b",
                                   "requires_grad_a", "requires_grad_b", "max_abs", "rel_l2",
                                   "cosine"}
    assert doc["totals"] == {"same": 2, "changed": 2, "added": 1, "removed": 1, "shape": 1,
                             "dtype": 1, "flags": 1}


def test_diff_tsv_hides_same_unless_all(pair: tuple[Path, Path, dict, dict]) -> None:
    pa, pb, _, _ = pair
    res = run_cli("diff", pa, pb)
    names = [line.split("\t")[0] for line in res.stdout.splitlines()]
    assert "same.w" not in names and "flag.w" in names  # flag change is shown
    assert all(len(line.split("\t")) == 7 for line in res.stdout.splitlines())
    every = run_cli("diff", pa, pb, "--all")
    assert "same.w" in [line.split("\t")[0] for line in every.stdout.splitlines()]


def test_diff_exit_code_and_structure_only(pair: tuple[Path, Path, dict, dict]) -> None:
    pa, pb, _, _ = pair
    assert run_cli("diff", pa, pb, "--exit-code", "-q").returncode == 4
    assert run_cli("diff", pa, pa, "--exit-code").returncode == 0
    res = run_cli("diff", pa, pb, "--structure-only", "-f", "json")
    rows = {r["name"]: r["status"] for r in json.loads(res.stdout)["tensors"]}
    assert rows["changed.w"] == "present" and rows["same.w"] == "present"
    assert rows["dtype.w"] == "dtype"


def test_diff_identical_copy_is_all_same(hf_bf16: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.safetensors"
    shutil.copyfile(hf_bf16, copy)
    doc = json.loads(run_cli("diff", hf_bf16, copy, "-f", "json").stdout)
    assert {r["status"] for r in doc["tensors"]} == {"same"}


def test_api_stats_and_diff_records(pair: tuple[Path, Path, dict, dict]) -> None:
    import paramctl

    pa, pb, _, _ = pair
    res = paramctl.diff(str(pa), str(pb))
    assert res.totals["removed"] == 1
    st = paramctl.stats(str(pa), ["same.w"])
    assert [r.name for r in st.rows] == ["same.w"]


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
                    reason="torchrun not installed")
def test_torchrun_ranks_equal_single_process(tmp_path: Path) -> None:
    torch.manual_seed(3)
    folder = tmp_path / "sharded"
    folder.mkdir()
    weight_map = {}
    for i in range(3):
        shard = f"model-{i + 1:05d}-of-00003.safetensors"
        tensors = {f"layer{i}.{k}": torch.randn(16, 8) for k in ("w", "v")}
        save_file(tensors, folder / shard)
        weight_map.update({n: shard for n in tensors})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    single = run_cli("stats", folder, "-f", "json", "--jobs", "1")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    import socket

    with socket.socket() as probe:  # a free port: no clash with another run's rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ranked = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                             "--master-port", str(port),
                             "-m", "paramctl", "stats", str(folder), "-f", "json"],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert ranked.returncode == 0, ranked.stderr[-2000:]
    assert ranked.stdout == single.stdout


def test_diff_html_page_is_self_contained(pair: tuple[Path, Path, dict, dict]) -> None:
    pa, pb, _, _ = pair
    res = run_cli("diff", pa, pb, "-f", "html")
    assert res.returncode == 0, res.stderr
    page = res.stdout
    assert page.startswith("<!DOCTYPE html>") and "changed.w" in page
    assert "http://" not in page and "https://" not in page
