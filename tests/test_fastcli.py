"""``list`` without Typer (:mod:`paramctl.fastcli`) behaves exactly as through the Typer app.

The fast path is what ``python -m paramctl`` and the console script run first; the Typer
path is what :func:`paramctl.cli.main` runs. Every command line here goes through both and
must give the same stdout, stderr and exit code. Lines the fast path does not fully
understand must be left to Typer (``parse_list`` returns ``None``).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import REPO, run_cli, run_inproc

from paramctl.fastcli import parse_list

Sample = Callable[[str], Path]


def _lines(samples: Path) -> list[list[str]]:
    st, pt, nested = (str(samples / n) for n in
                      ("transformer.safetensors", "transformer.pt", "transformer_nested.pt"))
    return [
        ["list", st],
        ["list", st, "-f", "tsv"],
        ["list", pt, "-f", "json"],
        ["list", st, "--format=jsonl"],
        ["list", pt, "-f", "names", "*.bias"],
        ["list", st, "encoder", "!*.bias", "-x", "*norm*"],
        ["list", st, "--exclude", "encoder", "--no-headers"],
        ["list", st, "--headers", "-f", "tsv"],
        ["list", pt, "--trainable", "-f", "tsv"],
        ["list", pt, "--frozen", "--allow-empty"],
        ["list", st, "--tree", "--depth", "2", "-f", "tsv"],
        ["list", st, "--tree", "-f", "json"],
        ["list", st, "-f", "table", "--width", "100"],
        ["list", st, "--tree", "-f", "table", "--width", "90"],
        ["list", nested, "--key", "model", "-f", "tsv"],
        # errors: usage, no match, bad source, each with its message and exit code
        ["list", st, "--trainable", "--frozen"],
        ["list", st, "--depth", "2"],
        ["list", st, "-f", "xml"],
        ["list", st, "no_such_module"],
        ["list", st, "Encoder.*"],
        ["list", str(samples / "missing.safetensors")],
        ["list", st, "--key", "model"],
        ["list", str(samples / "missing.pt"), "-f", "json"],
        ["list", "sample_models/mlp.py:NoSuchThing"],
        ["list", st, "re:("],
    ]


def test_fast_path_and_typer_app_agree(samples_dir: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    for args in _lines(samples_dir):
        fast = run_cli(*args)
        typer = run_inproc(capsys, *args)
        assert parse_list(args[1:]) is not None, args
        assert (fast.returncode, fast.stdout, fast.stderr) == \
            (typer.returncode, typer.stdout, typer.stderr), args


@pytest.mark.parametrize("args", [
    ["--help"], ["-h"], ["x.pt", "--debug"], ["x.pt", "--arg", "a=1"], ["x.pt", "--buffers"],
    ["x.pt", "--weights", "w.pt"], ["x.pt", "--unsafe-load"], ["x.pt", "--"], ["-"],
    ["x.pt", "-"], [], ["-f", "tsv"], ["x.pt", "-f"], ["x.pt", "-ftsv"], ["x.pt", "-f=tsv"],
    ["x.pt", "--depth", "0", "--tree"], ["x.pt", "--depth", "two"], ["x.pt", "--depth", "-1"],
    ["x.pt", "--width", "+3"], ["x.pt", "--tree=yes"], ["x.pt", "--no-such-option"],
    ["x.pt", "-f", "--tree"], ["x.pt", "-q"], [""],
    # its unmatched-prefix warning goes through the Typer app's warning handler
    ["x.pt", "--strip-prefix", "encoder."], ["x.pt", "--summary"], ["x.pt", "--fail-if-any"],
])
def test_unusual_lines_are_left_to_typer(args: list[str]) -> None:
    assert parse_list(args) is None


def test_parse_list_reads_what_typer_reads() -> None:
    got = parse_list(["m.safetensors", "enc", "--format=json", "-x", "a", "--exclude=b",
                      "--tree", "--depth", "3", "!c", "--no-headers", "--key", "k",
                      "--width=80", "-f", "tsv"])
    assert got == {"source": "m.safetensors", "patterns": ["enc", "!c"], "fmt": "tsv",
                   "exclude": ["a", "b"], "tree": True, "depth": 3, "headers": False,
                   "key": "k", "width": 80}


def test_fast_path_usage_errors_match_typer(capsys: pytest.CaptureFixture[str]) -> None:
    """Lines the fast path leaves alone still fail as before (through Typer)."""
    for args in (["list"], ["list", "x.pt", "--nope"], ["list", "x.pt", "--depth", "0",
                                                          "--tree"]):
        fast = run_cli(*args)
        typer = run_inproc(capsys, *args)
        assert (fast.returncode, fast.stderr) == (typer.returncode, typer.stderr), args
        assert fast.returncode == 2


def _modules_after(args: list[str]) -> set[str]:
    script = (
        "import os, sys, runpy\n"
        "def _exit(code):\n"
        "    raise SystemExit(code)\n"
        "os._exit = _exit\n"
        f"sys.argv = ['paramctl', *{args!r}]\n"
        "try:\n"
        "    runpy.run_module('paramctl', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "sys.stderr.write('MODULES ' + ' '.join(sorted(sys.modules)) + '\\n')\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                         timeout=60)
    line = next(ln for ln in res.stderr.splitlines() if ln.startswith("MODULES "))
    return set(line.split()[1:])


@pytest.mark.parametrize("fmt", ["tsv", "json", "names"])
def test_listing_a_safetensors_file_imports_only_what_it_needs(samples_dir: Path,
                                                               fmt: str) -> None:
    loaded = _modules_after(["list", str(samples_dir / "mlp.safetensors"), "-f", fmt])
    heavy = {"typer", "click", "rich", "torch", "numpy", "pydantic", "shellingham",
             "paramctl.cli", "paramctl.sources.pt", "paramctl.sources.dcp",
             "paramctl.sources.module", "paramctl.sources.sharded", "paramctl.sources.pickle_vm",
             "paramctl.rules", "zipfile", "pickletools", "tempfile", "difflib", "argparse"}
    tops = {m.split(".")[0] for m in loaded}
    assert not (heavy & (loaded | tops)), sorted(heavy & (loaded | tops))
    assert "paramctl.sources.safetensors" in loaded


def test_listing_a_torch_file_loads_only_its_reader(samples_dir: Path) -> None:
    loaded = _modules_after(["list", str(samples_dir / "mlp.pt"), "-f", "tsv"])
    assert "paramctl.sources.pt" in loaded
    assert not {"paramctl.sources.safetensors", "paramctl.sources.dcp", "typer",
                "torch"} & loaded


# -- init: the head-start copy --------------------------------------------------------------
def test_init_with_a_head_start_writes_what_the_typer_path_writes(
        samples_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = samples_dir / "transformer.safetensors"
    rule = "blocks.0.mlp.*=normal(std=0.02)"
    fast = run_cli("init", src, rule, "--seed", "3", "-o", tmp_path / "a.safetensors")
    typer = run_inproc(capsys, "init", src, rule, "--seed", "3", "-o",
                       tmp_path / "b.safetensors")
    assert (fast.returncode, fast.stdout) == (typer.returncode, typer.stdout)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]


def test_init_in_place_with_a_head_start(sample: Sample, tmp_path: Path) -> None:
    path = sample("transformer.safetensors")
    before = path.read_bytes()
    res = run_cli("init", path, "blocks.1.attn.*=zeros", "-q")
    assert res.returncode == 0, res.stderr
    after = path.read_bytes()
    assert len(after) == len(before) and after != before
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.mark.parametrize("rule", ["blocks.0.*=no_such_fn", "nothing_matches=zeros",
                                  "blocks.0.norm1.bias=xavier_uniform"])
def test_a_failed_init_leaves_no_head_start_behind(sample: Sample, rule: str) -> None:
    path = sample("transformer.safetensors")
    before = path.read_bytes()
    res = run_cli("init", path, rule, "-o", path.parent / "out.safetensors")
    assert res.returncode != 0
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_a_head_start_the_writer_cannot_use_is_dropped_before_it_writes(
        samples_dir: Path, tmp_path: Path) -> None:
    """A source with bytes after its data section (readers allow them; the output leaves
    them out) cannot be written over its copy: atomic_write stops and removes the copy
    before the write begins, so it never competes with the write (nor runs a second direct
    copy beside the writer's) until the process exits."""
    from paramctl.core import change
    from paramctl.io import files
    from paramctl.rules import Step, parse_init_rule

    src = tmp_path / "src.safetensors"
    src.write_bytes((samples_dir / "transformer.safetensors").read_bytes() + b"\0" * 4096)
    out = tmp_path / "out.safetensors"
    files.start_prefill(src, out)
    try:
        assert len(files._PREFILLS) == 1
        seen: list[list[str]] = []

        def progress(done: int, total: int) -> None:  # called while the output is written
            seen.append(sorted(p.name for p in tmp_path.iterdir()))

        step = Step("init", rules=(parse_init_rule("blocks.0.mlp.*=zeros"),))
        change(str(src), [step], out=out, progress=progress)
        assert files._PREFILLS == {}
        head_start = [n for n in seen[0] if n.startswith(".out.safetensors.paramctl-")]
        assert len(head_start) <= 1  # the writer's own temporary file, and no other
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors",
                                                              "src.safetensors"]
    finally:
        files.discard_all_prefills()


def test_prefill_reads_only_plain_init_lines() -> None:
    from paramctl.fastcli import prefill_for_init
    from paramctl.io import files

    started: list[tuple[Path, Path]] = []
    real = files.start_prefill
    files.start_prefill = lambda s, t: started.append((s, t))  # type: ignore[assignment]
    try:
        here = str(REPO / "README.md")
        for args in (["init", "x.safetensors", "a=zeros", "--dry-run"],
                     ["init", "x.safetensors", "a=zeros", "--max-shard-size", "1GB"],
                     ["init", "x.pt", "a=zeros"], ["freeze", "x.safetensors", "a"],
                     ["init", here, "a=zeros"], ["init", "missing.safetensors", "a=zeros"]):
            prefill_for_init(args)
        assert started == []
    finally:
        files.start_prefill = real  # type: ignore[assignment]
