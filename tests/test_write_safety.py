"""Rewrites are atomic: a failure inside the writer, a write that hits a file-size limit,
or a SIGKILL at any moment leaves either the original bytes or a complete result, and the
temporary files a killed run leaves behind are cleaned up by the next run."""

from __future__ import annotations

import os
import random
import resource
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import folder_state
from safetensors.torch import save_file

import paramctl
from paramctl.core import change
from paramctl.rules import Step, parse_init_rule

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
TEMP_MARK = ".paramctl-"


def temps(folder: Path) -> list[str]:
    return sorted(e.name for e in folder.iterdir() if TEMP_MARK in e.name)


def same_bytes(a: Path, b: Path, chunk: int = 16 << 20) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


# -- (a) a failure inside the writer ---------------------------------------------------------
class Boom(Exception):
    """Raised by the progress callback to fail a write from the inside."""


FREEZE_ALL = [Step("freeze", patterns=("*",))]
INIT_SOME = [Step("init", rules=(parse_init_rule("*.mlp.*=normal(std=0.1)"),
                                 parse_init_rule("lm_head=zeros")))]


@pytest.mark.parametrize("fraction", [0.0, 0.4, 0.9])
@pytest.mark.parametrize("to_out", [False, True], ids=["in-place", "to-out"])
@pytest.mark.parametrize(("name", "steps"), [
    ("llama.pt", FREEZE_ALL), ("llama.safetensors", FREEZE_ALL),
    ("llama.pt", INIT_SOME), ("llama.safetensors", INIT_SOME),
], ids=["pt-freeze", "st-freeze", "pt-init", "st-init"])
def test_failure_inside_writer_keeps_original(sample: Callable[[str], Path], tmp_path: Path,
                                              name: str, steps: list[Step], to_out: bool,
                                              fraction: float) -> None:
    path = sample(name)
    out = tmp_path / f"out{path.suffix}" if to_out else None
    stamp = folder_state(tmp_path)
    written: list[int] = []

    def progress(n: int, total: int) -> None:
        written.append(n)
        if sum(written) >= fraction * total:
            raise Boom(f"after {sum(written)} of {total} bytes")

    with pytest.raises(Boom):
        change(str(path), steps, out=out, seed=1, progress=progress)
    assert written
    assert folder_state(tmp_path) == stamp  # original byte-identical, nothing else created
    assert temps(tmp_path) == []

    # the same command without the failure then works
    result = change(str(path), steps, out=out, seed=1)
    assert result.written is not None and temps(tmp_path) == []
    if steps is FREEZE_ALL:
        assert len(paramctl.frozen_names(out or path)) == len(result.changes) > 0


def test_file_size_limit_fails_cleanly(sample: Callable[[str], Path], tmp_path: Path) -> None:
    """A real EFBIG from the kernel halfway through the temporary file."""
    path = sample("llama.safetensors")
    pt = sample("llama.pt")
    stamp = folder_state(tmp_path)
    limit = path.stat().st_size // 2

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    for target, args in ((path, ["freeze", "*"]), (pt, ["init", "*=zeros"]),
                         (path, ["freeze", "*", "-o", str(tmp_path / "o.safetensors")])):
        res = subprocess.run([sys.executable, "-m", "paramctl", args[0], str(target), *args[1:]],
                             capture_output=True, text=True, env=ENV, cwd=REPO, timeout=120,
                             preexec_fn=small_files)
        assert res.returncode == 1, res.stderr
        assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
        assert "unchanged" in res.stderr or "too large" in res.stderr
        assert folder_state(tmp_path) == stamp
        assert temps(tmp_path) == []


# -- (b) SIGKILL at a random moment ----------------------------------------------------------
BIG_TENSORS = 5
BIG_SHAPE = (2560, 4096)  # 40 MiB of float32 each, about 200 MiB per file


@pytest.fixture(scope="module")
def big_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("big")
    g = torch.Generator().manual_seed(0)
    state = {f"block.{i}.weight": torch.randn(BIG_SHAPE, generator=g)
             for i in range(BIG_TENSORS)}
    pt = folder / "big.pt"
    st = folder / "big.safetensors"
    torch.save(state, pt)
    save_file(state, str(st), metadata={"format": "pt", "kept": "yes"})
    return {".pt": pt, ".safetensors": st}


def _start(target: Path, command: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "paramctl", command, str(target), "*", "-q"],
                            env=ENV, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _wait_for_temp(proc: subprocess.Popen[bytes], folder: Path, timeout: float = 60) -> float:
    start = time.monotonic()
    while proc.poll() is None and not temps(folder) and time.monotonic() - start < timeout:
        time.sleep(0.0005)
    return time.monotonic()


def _is_complete_result(path: Path, original: Path) -> bool:
    """Every tensor frozen, readable, and with the original bytes."""
    names = [p.name for p in paramctl.inspect(str(path)).params]
    assert len(names) == BIG_TENSORS
    assert sorted(paramctl.frozen_names(path)) == sorted(names)
    if path.suffix == ".safetensors":
        import json
        import struct

        def data_section(p: Path) -> tuple[dict[str, object], int]:
            with p.open("rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                return json.loads(fh.read(n)), 8 + n

        new_header, new_start = data_section(path)
        old_start = data_section(original)[1]
        assert new_header["__metadata__"]["kept"] == "yes"  # type: ignore[index]
        assert path.stat().st_size - new_start == original.stat().st_size - old_start
        with path.open("rb") as a, original.open("rb") as b:
            a.seek(new_start)
            b.seek(old_start)
            while chunk := b.read(16 << 20):
                assert a.read(len(chunk)) == chunk
    else:
        with zipfile.ZipFile(path) as new, zipfile.ZipFile(original) as old:
            assert new.namelist() == old.namelist()
            assert new.testzip() is None  # every record's CRC checks out
            for info in old.infolist():
                if not info.filename.endswith("data.pkl"):
                    assert new.read(info.filename) == old.read(info), info.filename
        state = torch.load(path, weights_only=True, mmap=True)
        assert all(isinstance(t, torch.nn.Parameter) and not t.requires_grad
                   for t in state.values())
    return True


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_sigkill_leaves_original_or_complete_result(big_files: dict[str, Path], tmp_path: Path,
                                                    suffix: str) -> None:
    original = big_files[suffix]
    target = tmp_path / original.name

    # calibrate: how long the write phase (temp file present) takes on this machine
    shutil.copyfile(original, target)
    proc = _start(target, "freeze")
    began = _wait_for_temp(proc, tmp_path)
    assert proc.wait(timeout=120) == 0
    window = max(time.monotonic() - began, 0.05)
    assert _is_complete_result(target, original) and temps(tmp_path) == []

    rng = random.Random(f"sigkill{suffix}")
    fractions = [0.0, 0.25, 0.5, 0.8, 1.1]
    outcomes = []
    for fraction in fractions:
        shutil.copyfile(original, target)
        proc = _start(target, "freeze")
        _wait_for_temp(proc, tmp_path)
        time.sleep(max(0.0, (fraction + rng.uniform(-0.1, 0.1)) * window))
        running = proc.poll() is None
        proc.kill()
        proc.wait(timeout=60)
        left = temps(tmp_path)
        assert set(os.listdir(tmp_path)) == {target.name, *left}
        assert all(n.startswith(f".{target.name}.paramctl-") and n.endswith(".tmp") for n in left)
        if same_bytes(target, original):
            outcome = "original"
        else:
            assert _is_complete_result(target, original), fraction
            outcome = "complete"
        outcomes.append((fraction, running, outcome, len(left)))

        # the next run succeeds and removes what the killed one left behind
        follow = subprocess.run(
            [sys.executable, "-m", "paramctl", "freeze" if outcome == "original" else "unfreeze",
             str(target), "*", "-q"], env=ENV, cwd=REPO, capture_output=True, text=True,
            timeout=120)
        assert follow.returncode == 0, follow.stderr
        assert temps(tmp_path) == [], (outcomes, left)
        frozen = paramctl.frozen_names(target)
        assert len(frozen) == (BIG_TENSORS if outcome == "original" else 0)
    # at least one kill landed while the temporary file was being written
    assert any(running and outcome == "original" and left for _, running, outcome, left
               in outcomes), outcomes


def test_file_size_limit_mid_streamed_cast(tmp_path: Path) -> None:
    """EFBIG in the background writer of a streamed cast (tensors of several read-ahead
    pieces, bf16 -> float32 doubles the bytes): one line, exit 1, nothing changed."""
    g = torch.Generator().manual_seed(3)
    path = tmp_path / "m.safetensors"
    save_file({f"w{i}": torch.randn(3072, 1024, generator=g).to(torch.bfloat16)
               for i in range(4)}, str(path), metadata={"format": "pt"})
    stamp = folder_state(tmp_path)
    limit = path.stat().st_size + (1 << 20)

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    for args in (["--cast", "float32"], ["--cast", "float32", "-o", str(tmp_path / "o.st")]):
        res = subprocess.run([sys.executable, "-m", "paramctl", "convert", str(path), *args],
                             capture_output=True, text=True, env=ENV, cwd=REPO, timeout=120,
                             preexec_fn=small_files)
        assert res.returncode == 1, res.stderr
        assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
        assert folder_state(tmp_path) == stamp
        assert temps(tmp_path) == []
