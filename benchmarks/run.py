#!/usr/bin/env python3
"""Benchmark for the "Performance contract" in DESIGN.md.

Every case times a paramctl command side by side with a baseline command (alternating runs,
page cache warm) and reports medians, the median of per-pair time ratios and paramctl's peak
RSS. See benchmarks/README.md.

    python benchmarks/run.py [--quick] [--repeat N] [--cache-dir DIR] [--paramctl CMD]
                             [--only CASE]...

This process never imports torch: a child's ru_maxrss on Linux starts from the RSS high-water
mark of the process that spawned it, so the parent must stay small. The reference checkpoints
are built by a child process (`run.py --_build DIR`). Peer tools (`safetensors-print`,
`ckptkit`) run from their own virtualenvs, which this script creates under the cache dir.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import pty
import re
import shlex
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import sysconfig
import tempfile
import termios
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_VERSION = 3
CACHE_NAME = f"ref-v{CACHE_VERSION}"
MANIFEST = "MANIFEST.json"
SEED = 20240601
MIB = 1024 * 1024
GIB = 1024 * MIB
QUICK_NOTE = "quick mode: targets are NOT enforced; only command success is checked"


# --------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class Spec:
    """Shape of a Llama-style checkpoint (bf16, untied lm_head)."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int


BIG = Spec(hidden=2048, intermediate=5504, layers=24, vocab=32000)
# Same 219 names as BIG at about 0.1 GiB: `list` time must not grow with the data.
SMALL = Spec(hidden=416, intermediate=1120, layers=24, vocab=4096)
TINY = Spec(hidden=64, intermediate=172, layers=4, vocab=512)


@dataclass(frozen=True)
class MoeSpec:
    """A mixture-of-experts header: LAYERS x EXPERTS x (gate, up, down) tiny bf16 tensors."""

    layers: int
    experts: int
    shape: tuple[int, ...]


# 98,304 tensors: the "100,000 tensors" of DESIGN.md (a large MoE model has ~90k).
MOE = MoeSpec(layers=64, experts=512, shape=(4, 4))
MOE_TINY = MoeSpec(layers=2, experts=8, shape=(4, 4))
# Every CHANGED_EVERY-th tensor of big-10pct.safetensors differs from big.safetensors.
CHANGED_EVERY = 10
FILES = ("big.pt", "big.safetensors", "small.pt", "small.safetensors", "big-10pct.safetensors",
         "moe.safetensors")


def tensor_shapes(spec: Spec) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes in Hugging Face Llama state-dict order."""
    h, m = spec.hidden, spec.intermediate
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (spec.vocab, h))]
    for i in range(spec.layers):
        p = f"model.layers.{i}"
        shapes += [(f"{p}.self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"]
        shapes += [
            (f"{p}.mlp.gate_proj.weight", (m, h)),
            (f"{p}.mlp.up_proj.weight", (m, h)),
            (f"{p}.mlp.down_proj.weight", (h, m)),
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
        ]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (spec.vocab, h))]
    return shapes


def moe_names(spec: MoeSpec) -> list[str]:
    return [f"model.layers.{layer}.mlp.experts.{e}.{proj}_proj.weight"
            for layer in range(spec.layers) for e in range(spec.experts)
            for proj in ("gate", "up", "down")]


def random_bf16(shape: tuple[int, ...], index: int) -> torch.Tensor:
    """Deterministic random finite bf16 tensor in (-2, 2) (top exponent bit cleared)."""
    import numpy as np
    import torch

    n = 1
    for d in shape:
        n *= d
    bits = np.random.PCG64([SEED, index]).random_raw((n + 3) // 4).view(np.uint16)[:n]
    bits &= 0xBFFF
    return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).reshape(shape)


def write_checkpoint(spec: Spec, stem: Path, changed: Path | None = None) -> None:
    """Write STEM.pt (torch.save of the state dict) and STEM.safetensors; with CHANGED, also
    a copy of the .safetensors with every CHANGED_EVERY-th tensor holding new values."""
    import torch
    from safetensors.torch import save_file

    state = {name: random_bf16(shape, i) for i, (name, shape) in enumerate(tensor_shapes(spec))}
    torch.save(state, stem.with_suffix(".pt"))
    save_file(state, str(stem.with_suffix(".safetensors")), metadata={"format": "pt"})
    if changed is not None:
        for i, (name, shape) in enumerate(tensor_shapes(spec)):
            if i % CHANGED_EVERY == 0:
                state[name] = random_bf16(shape, 1_000_000 + i)
        save_file(state, str(changed), metadata={"format": "pt"})


def verify_checkpoint(spec: Spec, stem: Path, changed: Path | None = None) -> None:
    """Both files load, hold the expected names/shapes/dtype and bit-identical data; the
    changed copy differs in exactly the tensors it should."""
    import torch
    from safetensors import safe_open

    expected = dict(tensor_shapes(spec))
    pt = torch.load(stem.with_suffix(".pt"), weights_only=True, mmap=True)
    assert list(pt) == list(expected), "pt: names differ"
    with safe_open(str(stem.with_suffix(".safetensors")), "pt") as f:
        assert sorted(f.keys()) == sorted(expected), "safetensors: names differ"
        for name, shape in expected.items():
            st = f.get_tensor(name)
            for t in (pt[name], st):
                assert tuple(t.shape) == shape and t.dtype == torch.bfloat16, name
            assert torch.equal(pt[name].view(torch.int16), st.view(torch.int16)), name
    if changed is None:
        return
    with safe_open(str(changed), "pt") as f:
        assert sorted(f.keys()) == sorted(expected), "changed copy: names differ"
        for i, name in enumerate(expected):
            same = torch.equal(pt[name].view(torch.int16), f.get_tensor(name).view(torch.int16))
            assert same == (i % CHANGED_EVERY != 0), name


def write_moe(spec: MoeSpec, path: Path) -> None:
    """The many-tensor header: safetensors' own writer, so the header is ordered as real
    files are (by dtype, then name)."""
    import numpy as np
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    names = moe_names(spec)
    n = 1
    for d in spec.shape:
        n *= d
    raw = np.random.PCG64([SEED, 7]).random_raw((len(names) * n + 3) // 4).view(np.uint16)
    bits = (raw[: len(names) * n] & 0xBFFF).view(np.int16).reshape(len(names), *spec.shape)
    data = torch.from_numpy(bits.copy()).view(torch.bfloat16)
    save_file({name: data[i].clone() for i, name in enumerate(names)}, str(path),
              metadata={"format": "pt"})
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == sorted(names), "moe: names differ"


def build_main(directory: Path, quick: bool) -> int:
    """Child-process entry point: build and verify every reference file in DIRECTORY."""
    for label, spec in (("big", TINY if quick else BIG), ("small", TINY if quick else SMALL)):
        t0 = time.perf_counter()
        changed = directory / "big-10pct.safetensors" if label == "big" else None
        write_checkpoint(spec, directory / label, changed)
        verify_checkpoint(spec, directory / label, changed)
        print(f"  built {label}.pt/.safetensors{' and big-10pct.safetensors' if changed else ''}"
              f" in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    t0 = time.perf_counter()
    moe = MOE_TINY if quick else MOE
    write_moe(moe, directory / "moe.safetensors")
    print(f"  built moe.safetensors ({len(moe_names(moe)):,} tensors) in "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def manifest_for(big: Spec) -> dict[str, object]:
    small = TINY if big == TINY else SMALL  # --quick builds both at the tiny size
    moe = MOE_TINY if big == TINY else MOE
    return {
        "version": CACHE_VERSION,
        "seed": SEED,
        "specs": {"big": asdict(big), "small": asdict(small), "moe": asdict(moe)},
        "changed_every": CHANGED_EVERY,
        "tensors": {"big": len(tensor_shapes(big)), "small": len(tensor_shapes(small)),
                    "moe": len(moe_names(moe))},
    }


def cache_is_valid(directory: Path, expected: dict[str, object]) -> bool:
    try:
        found = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    sizes = found.pop("sizes", {})
    # JSON has no tuples: compare through the same round trip.
    if found != json.loads(json.dumps(expected)) or not isinstance(sizes, dict):
        return False
    return sorted(sizes) == sorted(FILES) and all(
        (directory / name).is_file() and (directory / name).stat().st_size == size
        for name, size in sizes.items()
    )


def remove_stale_builds(cache_dir: Path) -> None:
    """Delete temp build folders left by a build process that no longer exists."""
    for tmp in cache_dir.glob(f".{CACHE_NAME}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and Path(f"/proc/{pid}").exists()):
            shutil.rmtree(tmp, ignore_errors=True)


def build_cache(cache_dir: Path, quick: bool) -> Path:
    """Return a folder holding the reference files (``FILES``).

    Built in a temp folder by a child process, verified, given a MANIFEST.json and renamed
    into place, so an interrupted build is never mistaken for a complete one.
    """
    expected = manifest_for(TINY if quick else BIG)
    final = cache_dir / CACHE_NAME
    if cache_is_valid(final, expected):
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(cache_dir)
    free = shutil.disk_usage(cache_dir).free
    if not quick and free < 13 * GIB:
        sys.exit(f"error: {cache_dir} has {free / GIB:.1f} GiB free; need ~13 GiB")
    tmp = cache_dir / f".{CACHE_NAME}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    print(f"building reference checkpoints in {final} ...", file=sys.stderr)
    try:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_build", str(tmp)]
        subprocess.run(cmd + (["--quick"] if quick else []), check=True)
        sizes = {p.name: p.stat().st_size for p in tmp.iterdir()}
        (tmp / MANIFEST).write_text(json.dumps({**expected, "sizes": sizes}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:  # another run finished its build first
            if not cache_is_valid(final, expected):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Run:
    seconds: float
    maxrss_kib: int
    returncode: int
    problem: str  # empty when the run is good


# Children run as a user's shell would: with bytecode caching on. (This workplace sets
# PYTHONDONTWRITEBYTECODE, which would make every paramctl run recompile its modules
# while torch, the baseline, ships precompiled in site-packages.)
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def reset_rss_high_water_mark() -> None:
    """Best effort: a spawned child's ru_maxrss starts at this process's peak RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


TTY_SIZE = (48, 160)  # rows, columns of the terminal a `tty` case runs on


def _drain(master: int, sink: Path) -> None:
    """Copy what the child writes to its terminal into SINK until the terminal closes."""
    with open(sink, "wb") as out:
        while True:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # EIO: every copy of the child side is closed
                break
            if not chunk:
                break
            out.write(chunk)


def spawn(argv: Sequence[str], stdout: Path, stderr: Path, timeout: float,
          tty: bool = False, extra_env: dict[str, str] | None = None) -> Run:
    """Run ARGV once (cwd = repo root); wall time and peak RSS via os.wait4.

    With TTY, stdout is the child side of a new pseudo-terminal (TTY_SIZE), as when a person
    runs the command; a thread copies what appears on it into STDOUT.
    """
    reset_rss_high_water_mark()
    master = slave = -1
    drain: threading.Thread | None = None
    env = {**CHILD_ENV, **(extra_env or {})}
    if tty:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", *TTY_SIZE, 0, 0))
        env = {**env, "TERM": CHILD_ENV.get("TERM", "xterm-256color")}
        if env["TERM"] in ("", "dumb"):
            env["TERM"] = "xterm-256color"
        drain = threading.Thread(target=_drain, args=(master, stdout), daemon=True)
    try:
        with open(stdout if not tty else os.devnull, "wb") as out, open(stderr, "wb") as err:
            t0 = time.perf_counter()
            try:
                proc = subprocess.Popen(
                    list(argv), cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                    stdout=slave if tty else out, stderr=err, env=env,
                )
            except OSError as exc:
                return Run(0.0, 0, -1, f"cannot start: {exc}")
            if tty:
                os.close(slave)
                slave = -1
                assert drain is not None
                drain.start()
            timer = threading.Timer(timeout, os.kill, (proc.pid, signal.SIGKILL))
            timer.start()
            _, status, usage = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - t0
            timer.cancel()
            if drain is not None:
                drain.join(timeout=30)
    finally:
        for fd in (slave, master):
            if fd >= 0:
                os.close(fd)
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    problem = f"exit code {code}" if code else ""
    if code == -signal.SIGKILL and seconds >= timeout:
        problem = f"killed after the {timeout:.0f} s timeout"
    return Run(seconds, usage.ru_maxrss, code, problem)


def rss_floor_mib(scratch: Path) -> float:
    """Peak RSS reported for /bin/true: what a child inherits from this process."""
    run = spawn(["true"], scratch / "floor.out", scratch / "floor.err", 10)
    return run.maxrss_kib / 1024


# --------------------------------------------------------------------------- peers


@dataclass(frozen=True)
class Peer:
    """A single-purpose tool from PyPI that a case compares paramctl with."""

    command: str  # the console script the package installs
    requirement: str  # pinned, so that ratios stay comparable from run to run
    # ckptkit reads .pt files with torch. Its virtualenv sees the harness's site-packages
    # through a .pth file (appended to sys.path, after its own packages), so it runs on the
    # very torch the torch baselines use instead of installing 700 MB again.
    share_torch: bool = False


PEERS = {
    "safetensors-print": Peer("safetensors-print", "safetensors-print==0.1.0"),
    "ckptkit": Peer("ckptkit", "ckptkit[cli]==0.3.0", share_torch=True),
}


def _venv_site_packages(venv: Path) -> Path:
    return Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))


def _pip_install(venv: Path, requirement: str) -> subprocess.CompletedProcess[str]:
    """``pip install`` into VENV: with this interpreter's pip (``--python``, fast: the venv
    needs no pip of its own), else with pip bootstrapped into the venv."""
    quiet = ["--quiet", "--disable-pip-version-check"]
    cmd = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
           *quiet, requirement]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode == 0:
        return done
    boot = subprocess.run([str(venv / "bin" / "python"), "-m", "ensurepip", "--default-pip"],
                          capture_output=True, text=True, timeout=600)
    if boot.returncode != 0:
        return done
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", *quiet, requirement]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _runs(exe: Path) -> bool:
    """``EXE --help`` succeeds. A cached peer can stop working: pip leaves out of a
    share_torch venv what the building interpreter's site-packages already held (ckptkit's
    CLI needs typer and rich), so when those packages change or go, the peer breaks."""
    try:
        done = subprocess.run([str(exe), "--help"], capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def install_peer(peer: Peer, peers_dir: Path) -> tuple[Path | None, str]:
    """The peer's command, installed once into its own virtualenv under PEERS_DIR, or
    ``(None, why)`` when that fails (no network, no PyPI): the caller skips its cases."""
    key = hashlib.sha256(f"{peer}|{sys.prefix}".encode()).hexdigest()[:10]
    venv = peers_dir / f"{peer.command}-{key}"
    exe = venv / "bin" / peer.command
    try:
        peers_dir.mkdir(parents=True, exist_ok=True)
        with open(peers_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two harness runs must not build one venv
            if (venv / ".installed").is_file() and exe.exists() and _runs(exe):
                return exe, ""
            shutil.rmtree(venv, ignore_errors=True)
            t0 = time.perf_counter()
            print(f"installing peer {peer.requirement} into {venv} ...", file=sys.stderr)
            made = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)],
                                  capture_output=True, text=True, timeout=300)
            if made.returncode != 0:
                return None, f"python -m venv failed: {made.stderr.strip()[-300:]}"
            if peer.share_torch:
                paths = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
                site = _venv_site_packages(venv)
                (site / "_paramctl_bench_shared.pth").write_text("\n".join(paths) + "\n")
            done = _pip_install(venv, peer.requirement)
            if done.returncode != 0 or not exe.exists() or not _runs(exe):
                tail = " ".join((done.stderr or done.stdout).split())[-300:]
                shutil.rmtree(venv, ignore_errors=True)
                return None, f"pip install {peer.requirement} failed: {tail or 'no output'}"
            (venv / ".installed").write_text(peer.requirement + "\n")
            print(f"  installed in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            return exe, ""
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"cannot install {peer.requirement}: {exc}"


LAUNCHER = """#!{python}
# paramctl's console script, as pip writes it (pyproject.toml: [project.scripts]).
import sys
from paramctl.__main__ import main
sys.exit(main())
"""


def paramctl_launcher(peers_dir: Path) -> tuple[list[str], str]:
    """How paramctl runs by default: its console script in a clean virtualenv whose
    site-packages lists this checkout and this interpreter's site-packages as plain paths.

    That is what a user's (non-editable) install looks like. The development venv of an
    editable install runs an import hook at every Python start-up, paramctl's or not (about
    20 ms here), which no user and no peer pays. Falls back to ``python -m paramctl``.
    """
    key = hashlib.sha256(f"{REPO_ROOT}|{sys.prefix}|{LAUNCHER}".encode()).hexdigest()[:10]
    venv = peers_dir / f"paramctl-{key}"
    script = venv / "bin" / "paramctl"
    fallback = [sys.executable, "-m", "paramctl"]
    try:
        peers_dir.mkdir(parents=True, exist_ok=True)
        with open(peers_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not script.is_file():
                shutil.rmtree(venv, ignore_errors=True)
                made = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)],
                                      capture_output=True, text=True, timeout=300)
                if made.returncode != 0:
                    return fallback, f"python -m venv failed: {made.stderr.strip()[-300:]}"
                paths = [str(REPO_ROOT), *dict.fromkeys(
                    sysconfig.get_paths()[k] for k in ("purelib", "platlib"))]
                site = _venv_site_packages(venv)
                (site / "_paramctl_bench_checkout.pth").write_text("\n".join(paths) + "\n")
                tmp = script.with_suffix(".tmp")
                tmp.write_text(LAUNCHER.format(python=venv / "bin" / "python"))
                tmp.chmod(0o755)
                tmp.rename(script)
        return [str(script)], ""
    except (OSError, subprocess.SubprocessError) as exc:
        return fallback, f"cannot make the launcher venv: {exc}"


# --------------------------------------------------------------------------- cases

LIST_ST = (
    "import sys\n"
    "from safetensors import safe_open\n"
    "with safe_open(sys.argv[1], 'pt') as f:\n"
    "    for k in f.keys():\n"
    "        print(k, f.get_slice(k).get_shape())\n"
)
LIST_PT = (
    "import sys, torch\n"
    "sd = torch.load(sys.argv[1], weights_only=True, mmap=False)\n"
    "[print(k, tuple(v.shape), v.dtype) for k, v in sd.items()]\n"
)
IMPORT_TORCH = "import torch"
# What a user writes to list a sharded repo on the Hub (a fresh cache each run, as on first use).
HF_METADATA = (
    "import os, sys, tempfile\n"
    "with tempfile.TemporaryDirectory() as home:\n"
    "    os.environ['HF_HOME'] = home\n"
    "    from huggingface_hub import get_safetensors_metadata\n"
    "    meta = get_safetensors_metadata(sys.argv[1])\n"
    "    for f in meta.files_metadata.values():\n"
    "        for name, t in f.tensors.items():\n"
    "            print(name, t.dtype, t.shape)\n"
)
REMOTE_SHARDS = 160
REMOTE_LATENCY = 0.05
REMOTE_REPO = "bench/sharded"
# What a user writes instead of `paramctl stats`: per tensor, in float32 as torch computes.
STATS_TORCH = (
    "import sys, torch\n"
    "from safetensors import safe_open\n"
    "with safe_open(sys.argv[1], 'pt') as f:\n"
    "    for k in f.keys():\n"
    "        t = f.get_tensor(k).float()\n"
    "        print(k, t.min().item(), t.max().item(), t.mean().item(),\n"
    "              t.std(correction=0).item(), t.norm().item(),\n"
    "              int(t.isnan().sum()), int(t.isinf().sum()))\n"
)
# ... instead of `paramctl diff A B`: pair by name, torch.equal, then float64 metrics.
DIFF_TORCH = (
    "import sys, torch\n"
    "from safetensors import safe_open\n"
    "with safe_open(sys.argv[1], 'pt') as fa, safe_open(sys.argv[2], 'pt') as fb:\n"
    "    ka, kb = set(fa.keys()), set(fb.keys())\n"
    "    for k in sorted(ka | kb):\n"
    "        if k not in kb or k not in ka:\n"
    "            print(k, 'removed' if k in ka else 'added')\n"
    "            continue\n"
    "        a, b = fa.get_tensor(k), fb.get_tensor(k)\n"
    "        if a.shape != b.shape:\n"
    "            print(k, 'shape')\n"
    "        elif torch.equal(a, b):\n"
    "            print(k, 'same')\n"
    "        else:\n"
    "            a, b = a.double(), b.double()\n"
    "            na, nb = a.norm().item(), b.norm().item()\n"
    "            print(k, 'changed', (a - b).abs().max().item(), (a - b).norm().item() / na,\n"
    "                  torch.dot(a.flatten(), b.flatten()).item() / (na * nb))\n"
)
# ... instead of `paramctl convert --cast float16`.
CAST_TORCH = (
    "import sys, torch\n"
    "from safetensors.torch import load_file, save_file\n"
    "sd = load_file(sys.argv[1])\n"
    "save_file({k: v.to(torch.float16) for k, v in sd.items()}, sys.argv[2],\n"
    "          metadata={'format': 'pt'})\n"
)


@dataclass(frozen=True)
class Case:
    name: str
    paramctl: list[str]  # arguments after the paramctl command
    baseline: list[str]  # full argv
    target_ratio: float | None = None
    target_mib: float | None = None
    source: Path | None = None  # input of a write case
    out: Path | None = None  # file both commands write; checked, then deleted after each run
    min_lines: int = 0  # paramctl stdout must have at least this many lines
    env: dict[str, str] = field(default_factory=dict)  # added to both commands' environment
    target_seconds: float | None = None  # paramctl's median wall time must not exceed this
    tty: bool = False  # both commands write to a terminal (a pseudo-terminal), not a file
    skip: str = ""  # why the case cannot run here (a missing peer or module); never a failure

    @property
    def informational(self) -> bool:
        return self.target_ratio is None and self.target_mib is None


CASE_NAMES = [
    "list pt", "list small pt", "list safetensors", "list small safetensors", "mem safetensors",
    "list st vs st-print", "list pt vs ckptkit", "list 100k vs ckptkit", "table 100k tty",
    "tree 100k tty", "freeze pt", "freeze safetensors", "freeze 100k", "init safetensors",
    "stats", "diff", "convert cast vs torch", "convert cast vs cp", "convert rename pt",
    "list 7b module", "help", "list remote shards",
]  # fmt: skip
NO_CHECKPOINT_CASES = {"list 7b module", "help", "list remote shards"}
# Which peer each case's baseline runs (installed only when such a case is selected).
CASE_PEERS = {"list st vs st-print": "safetensors-print", "list pt vs ckptkit": "ckptkit",
              "list 100k vs ckptkit": "ckptkit", "table 100k tty": "ckptkit",
              "tree 100k tty": "ckptkit"}
INIT_RULE = "model.layers.[0-3].mlp.*=normal(std=0.02)"  # 4 of 24 MLPs: 10 % of the bytes


def case_key(name: str) -> str:
    """``list-pt``, ``list_pt`` and ``"List PT"`` all name the case ``list pt``."""
    return " ".join(re.sub(r"[-_()]", " ", name.lower()).split())


def numeric_missing() -> str:
    if (REPO_ROOT / "paramctl" / "numeric.py").is_file() or (
            REPO_ROOT / "paramctl" / "numeric" / "__init__.py").is_file():
        return ""
    return "needs paramctl/numeric.py, which is not in this tree yet"


def init_matched_mib(spec: Spec) -> float:
    """Bytes INIT_RULE re-initialises (layers 0-3, mlp), in MiB."""
    pattern = re.compile(r"model\.layers\.[0-3]\.mlp\.")
    n = sum(2 * math.prod(shape) for name, shape in tensor_shapes(spec) if pattern.match(name))
    return n / MIB


def copy_command(source: str, out: Path, sync: bool) -> list[str]:
    """`cp SOURCE OUT`, or with SYNC also fsync OUT (paramctl fsyncs what it writes)."""
    if not sync:
        return ["cp", source, str(out)]
    return ["sh", "-c", 'cp "$1" "$2" && sync "$2"', "sh", source, str(out)]


def make_cases(ckpt: Path, work: Path, tensors: dict[str, int], sync: bool, spec: Spec,
               peers: dict[str, tuple[Path | None, str]]) -> list[Case]:
    py = sys.executable
    big_pt, big_st = ckpt / "big.pt", ckpt / "big.safetensors"
    out_pt, out_st = work / "OUT.pt", work / "OUT.safetensors"
    bpt, bst, moe = str(big_pt), str(big_st), str(ckpt / "moe.safetensors")
    b10 = str(ckpt / "big-10pct.safetensors")
    spt, sst = str(ckpt / "small.pt"), str(ckpt / "small.safetensors")
    nb, ns, nm = tensors["big"], tensors["small"], tensors.get("moe", 0)
    no_numeric = numeric_missing()

    def peer(name: str) -> str:
        exe, _ = peers.get(name, (None, ""))
        return str(exe) if exe is not None else name

    cases = [
        Case("list pt", ["list", bpt, "-f", "tsv"], [py, "-c", LIST_PT, bpt],
             0.07, 80, min_lines=nb),
        Case("list small pt", ["list", spt, "-f", "tsv"], [py, "-c", LIST_PT, spt],
             min_lines=ns),
        Case("list safetensors", ["list", bst, "-f", "tsv"], [py, "-c", LIST_ST, bst],
             0.15, 80, min_lines=nb),
        # mem reads what list reads (metadata only, no torch): it must cost what list costs.
        Case("mem safetensors", ["mem", bst, "-f", "json"], [py, "-c", LIST_ST, bst],
             0.15, 80, min_lines=1),
        Case("list small safetensors", ["list", sst, "-f", "tsv"], [py, "-c", LIST_ST, sst],
             min_lines=ns),
        Case("list st vs st-print", ["list", bst, "-f", "tsv"],
             [peer("safetensors-print"), "--tensors", bst], 1.0, 80, min_lines=nb),
        Case("list pt vs ckptkit", ["list", bpt, "-f", "tsv"], [peer("ckptkit"), "info", bpt],
             0.06, 80, min_lines=nb),
        Case("list 100k vs ckptkit", ["list", moe, "-f", "tsv"], [peer("ckptkit"), "info", moe],
             1.0, None, min_lines=nm),
        Case("table 100k tty", ["list", moe], [peer("ckptkit"), "info", moe], 3.0, None,
             min_lines=nm, tty=True),
        Case("tree 100k tty", ["list", moe, "--tree"], [peer("ckptkit"), "info", moe], 3.0,
             None, min_lines=nm // 3, tty=True),
        Case("freeze pt", ["freeze", bpt, "model.layers.1*", "-o", str(out_pt)],
             copy_command(bpt, out_pt, sync), 1.15, 150, source=big_pt, out=out_pt),
        Case("freeze safetensors", ["freeze", bst, "model.layers.1*", "-o", str(out_st)],
             copy_command(bst, out_st, sync), 1.15, 150, source=big_st, out=out_st),
        Case("freeze 100k", ["freeze", moe, "model.layers.1*", "-o", str(out_st)],
             copy_command(moe, out_st, sync), 1.15, None, source=ckpt / "moe.safetensors",
             out=out_st),
        Case("init safetensors", ["init", bst, INIT_RULE, "--seed", "1", "-o", str(out_st)],
             copy_command(bst, out_st, sync), 1.6, math.ceil(init_matched_mib(spec) + 300),
             source=big_st, out=out_st),
        Case("stats", ["stats", bst, "-f", "tsv"], [py, "-c", STATS_TORCH, bst], 0.4, 300,
             min_lines=nb, skip=no_numeric),
        Case("diff", ["diff", bst, b10, "-f", "tsv"], [py, "-c", DIFF_TORCH, bst, b10], 0.5,
             300, min_lines=nb // CHANGED_EVERY, skip=no_numeric),
        Case("convert cast vs torch", ["convert", bst, "--cast", "float16", "-o", str(out_st)],
             [py, "-c", CAST_TORCH, bst, str(out_st)], 0.6, 300, source=big_st, out=out_st,
             skip=no_numeric),
        Case("convert cast vs cp", ["convert", bst, "--cast", "float16", "-o", str(out_st)],
             copy_command(bst, out_st, sync), 2.5, 300, source=big_st, out=out_st,
             skip=no_numeric),
        Case("convert rename pt", ["convert", bpt, "--rename", "model.=", "-o", str(out_pt)],
             copy_command(bpt, out_pt, sync), 1.15, 150, source=big_pt, out=out_pt),
        Case("list 7b module", ["list", "sample_models/llama.py:llama_7b", "-f", "tsv"],
             [py, "-c", IMPORT_TORCH], 2.5, 600, min_lines=1),
        Case("help", ["--help"], [py, "-c", IMPORT_TORCH], 0.15, None, min_lines=1),
    ]  # fmt: skip
    out = []
    for case in cases:
        name = CASE_PEERS.get(case.name)
        if name is not None and peers.get(name, (None, ""))[0] is None:
            why = peers.get(name, (None, "not installed"))[1]
            case = replace(case, skip=f"peer {name} unavailable ({why})")
        out.append(case)
    return out


# --------------------------------------------------------------------------- remote case


def write_tiny_shards(folder: Path, shards: int) -> int:
    """A sharded safetensors repo of SHARDS files with 2 tiny tensors each, written without
    torch (this process must not import it). Returns the number of tensors."""
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        for i in range(2):
            tensor = f"model.layers.{s}.mlp.w{i}.weight"
            offsets = [32 * i, 32 * i + 32]
            header[tensor] = {"dtype": "BF16", "shape": [4, 4], "data_offsets": offsets}
            weight_map[tensor] = name
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        (folder / name).write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(64))
    index = {"metadata": {"total_size": 64 * shards}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return len(weight_map)


def start_remote_server(work: Path) -> tuple[object, Case]:
    """Serve a REMOTE_SHARDS-shard repo on 127.0.0.1 with REMOTE_LATENCY per request (the
    fake Hub of the tests), and the case that lists it: `paramctl list hf://...` vs
    huggingface_hub's get_safetensors_metadata, both pointed at it by HF_ENDPOINT."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from fakehub import FakeHub

    repo = work / "remote-repo"
    repo.mkdir()
    tensors = write_tiny_shards(repo, REMOTE_SHARDS)
    hub = FakeHub(latency=REMOTE_LATENCY)
    hub.add_repo(REMOTE_REPO, repo)
    hub.start()
    env = {
        "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(work / "no-hf-home"), "HF_TOKEN": "",
        "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
        "HF_HUB_DISABLE_XET": "1", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1",
    }
    case = Case("list remote shards", ["list", f"hf://{REMOTE_REPO}", "-f", "tsv"],
                [sys.executable, "-c", HF_METADATA, REMOTE_REPO], 0.5, None,
                min_lines=tensors, env=env, target_seconds=1.5)
    return hub, case


def check_run(case: Case, run: Run, stdout: Path, is_paramctl: bool) -> Run:
    """Turn an exit-0 run that did not do the job into a failed run."""
    if run.problem:
        return run
    problem = ""
    if case.out is not None and not case.out.is_file():
        problem = f"exit 0 but {case.out.name} was not written"
    elif case.out and case.source and case.out.stat().st_size < 0.9 * case.source.stat().st_size:
        problem = f"exit 0 but {case.out.name} is much smaller than its source"
    elif is_paramctl and case.min_lines:
        with open(stdout, "rb") as f:
            lines = sum(1 for _ in f)
        if lines < case.min_lines:
            problem = f"exit 0 but printed {lines} lines, expected >= {case.min_lines}"
    return Run(run.seconds, run.maxrss_kib, run.returncode, problem)


# --------------------------------------------------------------------------- running a case


@dataclass
class Result:
    case: Case
    pairs: list[tuple[Run, Run]] = field(default_factory=list)
    failure: str = ""  # "command\nproblem\nstderr tail" of the first failed run

    @property
    def paramctl_median(self) -> float:
        return statistics.median(p.seconds for p, _ in self.pairs)

    @property
    def baseline_median(self) -> float:
        return statistics.median(b.seconds for _, b in self.pairs)

    @property
    def ratio(self) -> float:
        return statistics.median(p.seconds / b.seconds for p, b in self.pairs)

    @property
    def peak_mib(self) -> float:
        return max(p.maxrss_kib for p, _ in self.pairs) / 1024

    def verdict(self, quick: bool) -> str:
        if self.failure:
            return "ERROR"
        if self.case.skip:
            return "skip"
        if quick:
            return "ok"
        if self.case.informational:
            return "info"
        c = self.case
        bad_ratio = c.target_ratio is not None and self.ratio > c.target_ratio
        bad_mem = c.target_mib is not None and self.peak_mib > c.target_mib
        bad_time = c.target_seconds is not None and self.paramctl_median > c.target_seconds
        return "FAIL" if bad_ratio or bad_mem or bad_time else "PASS"


def describe_failure(argv: Sequence[str], run: Run, stderr: Path) -> str:
    text = stderr.read_text(errors="replace").splitlines()
    tail = "\n".join("    " + line for line in text[-40:]) or "    (no stderr)"
    return f"  command: {shlex.join(argv)}\n  problem: {run.problem}\n  stderr:\n{tail}"


def run_case(
    case: Case, paramctl: list[str], work: Path, repeat: int, warmup: bool, timeout: float
) -> Result:
    """Warm-up once each, then REPEAT alternating (paramctl, baseline) pairs."""
    result = Result(case)
    if case.skip:
        return result
    stdout, stderr = work / "stdout", work / "stderr"
    commands = (paramctl + case.paramctl, case.baseline)
    for i in range(repeat + (1 if warmup else 0)):
        pair: list[Run] = []
        for j, argv in enumerate(commands):
            run = spawn(argv, stdout, stderr, timeout, tty=case.tty, extra_env=case.env)
            run = check_run(case, run, stdout, is_paramctl=j == 0)
            if case.out is not None:
                case.out.unlink(missing_ok=True)
            if run.problem:
                result.failure = describe_failure(argv, run, stderr)
                return result
            pair.append(run)
        if not (warmup and i == 0):
            result.pairs.append((pair[0], pair[1]))
    return result


def warm_page_cache(paths: Sequence[Path]) -> None:
    """Read each file once (small buffer: this process's RSS leaks into children's)."""
    buf = bytearray(MIB)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


# --------------------------------------------------------------------------- reporting


def machine_info(paramctl: list[str], floor_mib: float) -> str:
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    versions = []
    for pkg in ("torch", "safetensors", "numpy"):
        try:
            versions.append(f"{pkg} {importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{pkg} missing")
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return (
        f"# {now} | {platform.node()} {platform.machine()} | nproc {os.cpu_count()} | "
        f"RAM {mem_kib / 1024 / 1024:.1f} GiB | Python {platform.python_version()} | "
        f"{' | '.join(versions)}\n"
        f"# paramctl: {shlex.join(paramctl)} | RSS floor of a child (/bin/true) "
        f"{floor_mib:.1f} MiB"
    )


COLUMNS = [("case", 23), ("paramctl s", 10), ("baseline s", 10), ("ratio", 9), ("target", 7),
           ("peak MiB", 9), ("target", 7), ("result", 6)]  # fmt: skip


def cell(value: float | None, spec: str, prefix: str = "") -> str:
    return "-" if value is None else f"{prefix}{value:{spec}}"


def table_row(cells: Sequence[str]) -> str:
    """Case name left-aligned, the rest right-aligned, always one space apart."""
    parts = [f"{cells[0]:<{COLUMNS[0][1]}}"]
    widths = [width for _, width in COLUMNS[1:-1]]
    parts += [f"{text:>{width}}" for text, width in zip(cells[1:-1], widths, strict=True)]
    return " ".join([*parts, f" {cells[-1]}"])


def print_table(results: list[Result], quick: bool) -> None:
    header = table_row([name for name, _ in COLUMNS])
    print(header)
    print("-" * len(header))
    for r in results:
        c, ok = r.case, bool(r.pairs)
        print(
            table_row(
                [
                    c.name,
                    cell(r.paramctl_median if ok else None, ".3f"),
                    cell(r.baseline_median if ok else None, ".3f"),
                    cell(r.ratio if ok else None, ".3f" if not ok or r.ratio < 1000 else ".0f"),
                    cell(c.target_ratio, ".2f", "<="),
                    cell(r.peak_mib if ok else None, ".1f"),
                    cell(c.target_mib, ".0f", "<="),
                    r.verdict(quick),
                ]
            )
        )


def print_absolute(results: list[Result]) -> None:
    """Cases that also hold paramctl to a wall time (the table's ratio is the other half)."""
    for r in results:
        if r.case.target_seconds is not None and r.pairs:
            print(f"{r.case.name}: paramctl {r.paramctl_median:.3f} s (target <= "
                  f"{r.case.target_seconds:.1f} s), baseline {r.baseline_median:.3f} s")


def print_growth(results: list[Result]) -> None:
    """Show big vs small list times: list cost should not grow with data size."""
    by_name = {r.case.name: r for r in results if r.pairs}
    for fmt_name in ("pt", "safetensors"):
        big, small = by_name.get(f"list {fmt_name}"), by_name.get(f"list small {fmt_name}")
        if big and small:
            print(
                f"list {fmt_name}: big {big.paramctl_median:.3f} s vs small "
                f"{small.paramctl_median:.3f} s (x{big.paramctl_median / small.paramctl_median:.2f}"
                f"; baseline x{big.baseline_median / small.baseline_median:.2f})"
            )


def python_startup(scratch: Path) -> float:
    """Median wall time of starting and stopping this Python (``-I -c pass``, 5 runs)."""
    runs = [spawn([sys.executable, "-I", "-c", "pass"], scratch / "py.out", scratch / "py.err",
                  30).seconds for _ in range(5)]
    return statistics.median(runs)


def print_floors(results: list[Result], startup: float) -> None:
    """Name each ratio target that is shorter than starting Python, measured just now: no
    Python command can meet it, so its row shows a cost, not a reachable goal."""
    for r in results:
        limit = r.case.target_ratio
        if r.pairs and limit is not None and r.baseline_median * limit < startup:
            print(f"note: {r.case.name}: {limit} x the baseline is "
                  f"{r.baseline_median * limit * 1000:.0f} ms, less than starting Python "
                  f"(`python -I -c pass`: {startup * 1000:.0f} ms here, now); no Python "
                  "command can meet it")


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny checkpoint in a temp dir, 1 run per case, targets not enforced",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="measured pairs per case (default 5; 1 with --quick)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where the reference checkpoints are cached "
        "(default $PARAMCTL_BENCH_DIR or ~/.cache/paramctl-bench)",
    )
    parser.add_argument(
        "--paramctl", default=None, help="command that runs paramctl (default: its console "
        "script in a clean virtualenv that sees this checkout; see paramctl_launcher)"
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="CASE",
        help=f"run only this case (repeatable): {', '.join(CASE_NAMES)}",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="kill any single command after this many seconds",
    )
    parser.add_argument(
        "--plain-cp-baseline",
        dest="sync_baseline",
        action="store_false",
        help="compare writes with a bare `cp` (the copy stays in the page cache) instead "
        "of the default `cp SRC OUT && sync OUT`, which is as durable as paramctl's "
        "fsync'd write",
    )
    parser.add_argument("--_build", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    known = {case_key(name): name for name in CASE_NAMES}
    unknown = sorted(o for o in args.only if case_key(o) not in known)
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {CASE_NAMES}")
    args.only = [known[case_key(o)] for o in args.only]
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be >= 1")
    return args


def default_cache_dir() -> Path:
    env = os.environ.get("PARAMCTL_BENCH_DIR")
    return Path(env) if env else Path.home() / ".cache" / "paramctl-bench"


def run_all(args: argparse.Namespace, cache_dir: Path, peers_dir: Path) -> int:
    launcher_note = ""
    if args.paramctl:
        paramctl = shlex.split(args.paramctl)
    else:
        paramctl, launcher_note = paramctl_launcher(peers_dir)
    repeat = args.repeat or (1 if args.quick else 5)
    work = Path(tempfile.mkdtemp(prefix=f"work-{os.getpid()}-", dir=cache_dir))
    server: object | None = None
    try:
        names = args.only or CASE_NAMES
        ckpt, tensors = work, {"big": 0, "small": 0, "moe": 0}
        if not set(names) <= NO_CHECKPOINT_CASES:
            ckpt = build_cache(cache_dir, args.quick)
            tensors = json.loads((ckpt / MANIFEST).read_text())["tensors"]
            warm_page_cache(sorted(p for p in ckpt.iterdir() if p.name != MANIFEST))
        wanted = {CASE_PEERS[n] for n in names if n in CASE_PEERS}
        peers = {name: install_peer(PEERS[name], peers_dir) for name in sorted(wanted)}
        spec = TINY if args.quick else BIG
        cases = [c for c in make_cases(ckpt, work, tensors, args.sync_baseline, spec, peers)
                 if c.name in names]
        if "list remote shards" in names:
            server, remote_case = start_remote_server(work)
            cases.append(remote_case)
        print(machine_info(paramctl, rss_floor_mib(work)))
        if args.quick:
            print(f"# {QUICK_NOTE}")
        if launcher_note:
            print(f"# paramctl launcher unavailable ({launcher_note}); using python -m paramctl")
        for name, (exe, why) in peers.items():
            print(f"# peer {name}: {exe}" if exe else f"# peer {name}: UNAVAILABLE, {why}")
        results = []
        for case in cases:
            print(f"running {case.name} ...", file=sys.stderr, flush=True)
            results.append(run_case(case, paramctl, work, repeat, not args.quick, args.timeout))
        print_table(results, args.quick)
        print_absolute(results)
        print_growth(results)
        if not args.quick:
            print_floors(results, python_startup(work))
        return report_failures(results, args.quick)
    finally:
        if server is not None:
            server.stop()  # type: ignore[attr-defined]
        shutil.rmtree(work, ignore_errors=True)


def report_failures(results: list[Result], quick: bool) -> int:
    for r in results:
        if r.case.skip:
            print(f"skipped {r.case.name}: {r.case.skip}")
    failed = [r for r in results if r.failure]
    for r in failed:
        print(f"\nERROR in {r.case.name}:\n{r.failure}")
    missed = [r.case.name for r in results if r.verdict(quick) == "FAIL"]
    if missed:
        print(f"\ntargets missed: {', '.join(missed)}")
    if quick:
        print(f"\n{QUICK_NOTE}")
    return 1 if failed or missed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args._build is not None:
        return build_main(args._build, args.quick)
    cache_dir = (args.cache_dir or default_cache_dir()).expanduser().resolve()
    # Peers are tools, not data: kept in the cache dir even by --quick (a few MiB).
    peers_dir = cache_dir / "peers"
    if args.quick:
        with tempfile.TemporaryDirectory(prefix="paramctl-bench-") as tmp:
            return run_all(args, Path(tmp), peers_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    return run_all(args, cache_dir, peers_dir)


if __name__ == "__main__":
    sys.exit(main())
