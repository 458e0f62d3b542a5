"""Write safety under faults: kill -9 mid-rewrite, a full disk, a read-only folder, two
writers at once, leftover temporary files, and what --debug shows.

The kill trials rewrite a ~300 MB checkpoint in place and SIGKILL the writer at a random
moment: the file must afterwards be byte-identical to the original, or (if the kill came
after the rename) to the complete new file. ``PARAMCTL_KILL_TRIALS`` (default 10 per format)
sets the number of trials; ``PARAMCTL_KILL_SEED`` replays a run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from paramctl.core import inspect

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
KILL_TRIALS = int(os.environ.get("PARAMCTL_KILL_TRIALS", "10"))
KILL_SEED = int(os.environ.get("PARAMCTL_KILL_SEED", str(random.randrange(1 << 30))))
TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.paramctl-[A-Za-z0-9_]+\.tmp$")
FORMATS = ("pt", "safetensors")


def paramctl(*args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-m", "paramctl", *map(str, args)]


def run(*args: str | os.PathLike[str], preexec: Callable[[], None] | None = None,
        env: dict[str, str] | None = None, timeout: float = 120
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(paramctl(*args), capture_output=True, text=True, cwd=REPO,
                          env=env or ENV, timeout=timeout, preexec_fn=preexec)


def one_error_line(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".paramctl-" in p.name)


def digest(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha1").hexdigest()


# ---------------------------------------------------------------------------------------
# a ~300 MB checkpoint in both formats


@dataclass
class Big:
    pristine: Path
    original: str  # sha1 of the pristine file
    rewritten: str  # sha1 after `freeze 'layer0.*'`
    seconds: float  # wall time of that rewrite


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Big]:
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("big")
    gen = torch.Generator().manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(2500, 2500, generator=gen) for i in range(12)}
    state["layer0.bias"] = torch.randn(2500, generator=gen)
    out: dict[str, Big] = {}
    for fmt in FORMATS:
        pristine = folder / f"pristine.{fmt}"
        if fmt == "pt":
            torch.save(state, pristine)
        else:
            save_file(state, str(pristine))
        copy = folder / f"reference.{fmt}"
        times = []
        for _ in range(2):  # the second run, page cache warm, is what the trials see
            shutil.copyfile(pristine, copy)
            start = time.monotonic()
            result = run("freeze", copy, "layer0.*", "-q")
            times.append(time.monotonic() - start)
            assert result.returncode == 0, result.stderr
        out[fmt] = Big(pristine, digest(pristine), digest(copy), min(times))
        assert out[fmt].original != out[fmt].rewritten
        copy.unlink()
    del state
    return out


def _fresh(target: Path, pristine: Path) -> None:
    """Point ``target`` at the pristine bytes (a hard link: no 300 MB copy per trial).
    A writer that modified its input in place would change the pristine file too, which
    the final check catches."""
    target.unlink(missing_ok=True)
    os.link(pristine, target)


@pytest.mark.parametrize("fmt", FORMATS)
def test_sigkill_during_in_place_rewrite(fmt: str, big: dict[str, Big], tmp_path: Path) -> None:
    ref = big[fmt]
    rng = random.Random(f"{KILL_SEED}-{fmt}")
    target = tmp_path / f"model.{fmt}"
    outcomes: Counter[str] = Counter()
    for trial in range(KILL_TRIALS):
        _fresh(target, ref.pristine)
        before = set(temps(tmp_path))
        proc = subprocess.Popen(paramctl("freeze", target, "layer0.*", "-q"), cwd=REPO,
                                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if trial % 2 == 0:
            # anywhere in the run: start-up, reading, writing, fsync, rename
            time.sleep(rng.uniform(0.0, ref.seconds * 1.1))
        else:
            # aimed at the write: wait for this run's temporary file, then a bit more
            deadline = time.monotonic() + ref.seconds * 3 + 5
            while time.monotonic() < deadline and proc.poll() is None:
                if set(temps(tmp_path)) - before:
                    break
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, ref.seconds * 0.7))
        finished = proc.poll() is not None
        proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
        if finished:
            assert proc.returncode == 0, stderr
        after = digest(target)
        left = set(temps(tmp_path)) - before
        if after == ref.original:
            outcome = "original intact" + (", temp file left" if left else "")
        else:
            assert after == ref.rewritten, f"trial {trial} (seed {KILL_SEED}): corrupt file"
            outcome = "finished" if finished else "killed after the rename"
        outcomes[outcome] += 1
        for name in temps(tmp_path):
            match = TEMP_NAME.match(name)
            assert match and match["target"] == target.name, name
    print(f"\n{fmt}: {KILL_TRIALS} SIGKILL trials (seed {KILL_SEED}): {dict(outcomes)}")
    assert digest(ref.pristine) == ref.original
    if KILL_TRIALS >= 6:
        assert outcomes["original intact, temp file left"] > 0, "no kill landed mid-write"
    # The next run removes what the killed ones left behind.
    _fresh(target, ref.pristine)
    result = run("freeze", target, "layer0.*", "-q")
    assert result.returncode == 0, result.stderr
    assert temps(tmp_path) == []
    assert digest(target) == ref.rewritten


@pytest.mark.parametrize("fmt", FORMATS)
def test_sigint_during_rewrite_cleans_up(fmt: str, big: dict[str, Big], tmp_path: Path) -> None:
    """Ctrl-C mid-write: exit 130, one line, original intact, no temporary file."""
    ref = big[fmt]
    target = tmp_path / f"model.{fmt}"
    for _ in range(3):
        _fresh(target, ref.pristine)
        proc = subprocess.Popen(paramctl("freeze", target, "layer0.*", "-q"), cwd=REPO,
                                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        while proc.poll() is None and not temps(tmp_path):
            time.sleep(0.002)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        if proc.returncode == 0:  # finished first
            assert digest(target) == ref.rewritten
            continue
        assert proc.returncode == 130, stderr
        assert digest(target) == ref.original
        assert temps(tmp_path) == []
        assert stderr.splitlines() == ["error: interrupted"], stderr


def test_sigint_during_streamed_cast_cleans_up(tmp_path: Path) -> None:
    """Ctrl-C while the reader, cast and writer threads of convert --cast run: exit 130,
    one line, the original intact, no temporary file, no thread left to hang the exit."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    pristine = tmp_path / "pristine.safetensors"
    save_file({f"w{i}": torch.randn(4096, 4096, generator=g).to(torch.bfloat16)
               for i in range(6)}, str(pristine))  # 192 MiB of bf16, 384 MiB cast
    original = digest(pristine)
    target = tmp_path / "model.safetensors"
    interrupted = 0
    for delay in (0.0, 0.05, 0.15):
        _fresh(target, pristine)
        proc = subprocess.Popen(paramctl("convert", target, "--cast", "float32", "-q"),
                                cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        while proc.poll() is None and not [t for t in temps(tmp_path) if "model" in t]:
            time.sleep(0.002)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        if proc.returncode == 0:  # finished first
            continue
        interrupted += 1
        assert proc.returncode == 130, stderr
        assert digest(target) == original
        assert temps(tmp_path) == []
        assert stderr.splitlines() == ["error: interrupted"], stderr
    assert interrupted > 0, "every run finished before the interrupt"


# ---------------------------------------------------------------------------------------
# two writers on one file


def _frozen(path: Path) -> set[str]:
    return {p.name for p in inspect(str(path)).params if not p.requires_grad}


def _same_tensors(path: Path, pristine: Path) -> bool:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        a, b = load_file(str(path)), load_file(str(pristine))
    else:
        a = torch.load(path, weights_only=True, mmap=True)
        b = torch.load(pristine, weights_only=True, mmap=True)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# "is locked by another process": the holder let go before /proc/locks could name it
_REFUSALS = ("being rewritten by another paramctl process", "changed while paramctl",
             "replaced by another process", "is locked by another process")


@pytest.mark.parametrize("fmt", FORMATS)
def test_concurrent_writers(fmt: str, big: dict[str, Big], tmp_path: Path) -> None:
    ref = big[fmt]
    target = tmp_path / f"model.{fmt}"
    rng = random.Random(f"{KILL_SEED}-concurrent-{fmt}")
    outcomes: Counter[str] = Counter()
    for trial in range(4):
        _fresh(target, ref.pristine)
        patterns = ["layer1.*", "layer2.*"]
        procs = []
        for pattern in patterns:
            procs.append(subprocess.Popen(
                paramctl("freeze", target, pattern, "-q"), cwd=REPO, env=ENV,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
            time.sleep(rng.uniform(0.0, ref.seconds * 0.5) if trial else 0.0)
        results = [(p.wait(timeout=120), p.communicate()[1]) for p in procs]
        won = set()
        for pattern, (code, stderr) in zip(patterns, results, strict=True):
            if code == 0:
                won.add(pattern.replace(".*", ".weight"))
                continue
            lines = stderr.splitlines()
            assert code == 1 and len(lines) == 1, stderr
            assert any(r in lines[0] for r in _REFUSALS), lines[0]
        outcomes[f"{len(won)} succeeded"] += 1
        assert won, "both writers refused"
        # Never a corrupt file, and no lost update: each writer that reported success
        # has its change in the final file.
        assert _frozen(target) == won, (results, _frozen(target))
        assert _same_tensors(target, ref.pristine)
        assert temps(tmp_path) == []
    print(f"\n{fmt}: concurrent writers: {dict(outcomes)}")


@pytest.mark.parametrize("name", ["mlp.pt", "mlp.safetensors"])
def test_writer_refused_while_locked(name: str, sample: Callable[[str], Path]) -> None:
    path = sample(name)
    before = path.read_bytes()
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what another paramctl holds while writing
        line = one_error_line(run("freeze", path, "*"))
    finally:
        os.close(fd)
    # the holder is this test process, not a paramctl: the message names it and says so
    assert f"is locked by another process (pid {os.getpid()}: " in line
    assert "pass --wait SECONDS" in line
    assert path.read_bytes() == before
    assert temps(path.parent) == []


# ---------------------------------------------------------------------------------------
# full disk


def _fsize_limit(limit: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


FULL_DISK_CASES = [
    ("mlp.pt", ["freeze", "*"], None),
    ("mlp.safetensors", ["freeze", "*"], None),
    ("transformer_nested.pt", ["freeze", "*"], None),
    ("transformer_nested.pt", ["init", "*.weight=zeros"], None),
    ("llama.safetensors", ["init", "*.weight=normal(std=0.02)", "--seed", "1"], None),
    ("mlp.pt", ["freeze", "*"], "out.pt"),
    ("mlp.pt", ["freeze", "*"], "out.safetensors"),
    ("llama.safetensors", ["freeze", "*"], "out.pt"),
]


@pytest.mark.parametrize(("name", "command", "out"), FULL_DISK_CASES,
                         ids=[f"{n}-{c[0]}-{o or 'in-place'}" for n, c, o in FULL_DISK_CASES])
def test_full_disk_rlimit_fsize(name: str, command: list[str], out: str | None,
                                sample: Callable[[str], Path]) -> None:
    path = sample(name)
    before = path.read_bytes()
    extra = ["-o", str(path.parent / out)] if out else []
    result = run(command[0], path, *command[1:], *extra,
                 preexec=_fsize_limit(len(before) // 2))
    line = one_error_line(result)
    assert "cannot write" in line and "file too large" in line, line
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [name]


def _namespace_works() -> str | None:
    """None if `unshare -m` plus mount works here, else the reason it does not."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "unshare/mount not installed"
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs -o size=64k tmpfs /mnt && umount /mnt"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"no private mount namespace: {probe.stderr.strip()}"
    return None


def _run_in_namespace(script: str, *args: str) -> dict[str, object]:
    """Run a Python script in a private mount namespace (mounts vanish when it exits)."""
    result = subprocess.run(
        ["unshare", "-m", "--propagation", "private", sys.executable, "-c",
         textwrap.dedent(script), *args],
        capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


_ENOSPC_SCRIPT = """
    import hashlib, json, os, shutil, subprocess, sys
    src, folder, size = sys.argv[1], sys.argv[2], sys.argv[3]
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder], check=True)
    path = os.path.join(folder, os.path.basename(src))
    shutil.copyfile(src, path)
    before = hashlib.sha1(open(path, "rb").read()).hexdigest()
    r = subprocess.run([sys.executable, "-m", "paramctl", "freeze", path, "*"],
                       capture_output=True, text=True)
    print(json.dumps({"code": r.returncode, "stderr": r.stderr,
                      "same": hashlib.sha1(open(path, "rb").read()).hexdigest() == before,
                      "files": sorted(os.listdir(folder))}))
"""


def test_full_disk_real_enospc(samples_dir: Path, tmp_path: Path) -> None:
    reason = _namespace_works()
    if reason:
        pytest.skip(reason)
    src = samples_dir / "transformer_nested.pt"
    size = src.stat().st_size
    folder = tmp_path / "small-disk"
    folder.mkdir()
    # room for the original and half a copy
    out = _run_in_namespace(_ENOSPC_SCRIPT, str(src), str(folder), str(size * 3 // 2))
    lines = str(out["stderr"]).splitlines()
    assert out["code"] == 1 and len(lines) == 1, out
    assert "no space left on device" in lines[0] and "original is unchanged" in lines[0]
    assert out["same"] is True
    assert out["files"] == [src.name]


# ---------------------------------------------------------------------------------------
# read-only folder (we are root: chmod does not stop us, a read-only mount does)


_READONLY_SCRIPT = """
    import json, subprocess, sys
    folder = sys.argv[1]
    subprocess.run(["mount", "--bind", folder, folder], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", folder], check=True)
    results = []
    for args in json.loads(sys.argv[2]):
        r = subprocess.run([sys.executable, "-m", "paramctl", *args],
                           capture_output=True, text=True)
        results.append({"code": r.returncode, "stderr": r.stderr})
    print(json.dumps({"results": results}))
"""


def _run_read_only(folder: Path, commands: list[list[str]]) -> tuple[str, list[dict[str, object]]]:
    """Run paramctl ``commands`` with ``folder`` read-only: a read-only bind mount in a
    private mount namespace, else ``chattr +i`` on the folder; skip if neither works."""
    if _namespace_works() is None:
        out = _run_in_namespace(_READONLY_SCRIPT, str(folder), json.dumps(commands))
        return "read-only bind mount", list(out["results"])  # type: ignore[call-overload]
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)],
                                                 capture_output=True).returncode == 0:
        try:
            results = []
            for args in commands:
                r = run(*args)
                results.append({"code": r.returncode, "stderr": r.stderr})
            return "chattr +i", results
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
    pytest.skip("no way to make a folder read-only for root here (no mount namespace, "
                "no chattr +i)")


@pytest.mark.parametrize("name", ["mlp.pt", "mlp.safetensors", "transformer_nested.pt"])
def test_read_only_folder(name: str, samples_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / name
    shutil.copyfile(samples_dir / name, path)
    before = path.read_bytes()
    # a stale temp that cannot be removed either: still a clean error
    stale = folder / f".{name}.paramctl-stale.tmp"
    stale.write_bytes(b"x")
    key = ["--key", "model"] if "nested" in name else []  # a conversion keeps weights only
    commands = [["freeze", str(path), "*"], ["init", str(path), "*.bias=zeros"],
                ["freeze", str(path), "*", "-o", str(folder / "out.pt")],
                ["freeze", str(path), "*", *key, "-o", str(folder / "out.safetensors")]]
    how, results = _run_read_only(folder, commands)
    for args, res in zip(commands, results, strict=True):
        lines = str(res["stderr"]).splitlines()
        assert res["code"] == 1 and len(lines) == 1, (how, args, res)
        assert lines[0].startswith("error: ") and "Traceback" not in lines[0]
        assert "cannot write" in lines[0] and str(folder) in lines[0], (how, lines[0])
        assert "read-only" in lines[0] or "permission denied" in lines[0], (how, lines[0])
    assert path.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == sorted([name, stale.name])


# ---------------------------------------------------------------------------------------
# leftover temporary files


@pytest.mark.parametrize("name", ["mlp.pt", "mlp.safetensors"])
def test_stale_temp_files_removed_by_next_run(name: str, sample: Callable[[str], Path]) -> None:
    path = sample(name)
    folder = path.parent
    mine = [folder / f".{name}.paramctl-k1ll3d.tmp", folder / f".{name}.paramctl-x_9.tmp"]
    others = [folder / ".other.pt.paramctl-abc.tmp",  # another file's: not ours to touch
              folder / f".{name}.paramctl-abc.tmp.keep",  # not our name pattern
              folder / f"{name}.paramctl-abc.tmp"]  # no leading dot
    for p in mine + others:
        p.write_bytes(b"partial")
    result = run("freeze", path, "*", "-q")
    assert result.returncode == 0, result.stderr
    assert not any(p.exists() for p in mine)
    assert all(p.exists() for p in others)


def test_stale_temp_for_output_removed(sample: Callable[[str], Path]) -> None:
    path = sample("mlp.pt")
    stale = path.parent / ".out.safetensors.paramctl-old.tmp"
    stale.write_bytes(b"partial")
    result = run("freeze", path, "*", "-q", "-o", path.parent / "out.safetensors")
    assert result.returncode == 0, result.stderr
    assert not stale.exists()
    assert temps(path.parent) == []


def test_temp_file_name_is_recognisable(big: dict[str, Big], tmp_path: Path) -> None:
    """While a rewrite runs, its temporary file sits next to the target as
    .NAME.paramctl-*.tmp."""
    target = tmp_path / "model.pt"
    _fresh(target, big["pt"].pristine)
    proc = subprocess.Popen(paramctl("freeze", target, "layer0.*", "-q"), cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: set[str] = set()
    while proc.poll() is None:
        seen.update(temps(tmp_path))
        time.sleep(0.001)
    assert proc.returncode == 0
    assert seen, "the rewrite was too quick to observe"
    assert all(TEMP_NAME.match(n) and TEMP_NAME.match(n)["target"] == "model.pt" for n in seen)
    assert temps(tmp_path) == []


# ---------------------------------------------------------------------------------------
# --debug


@pytest.fixture
def corrupt(tmp_path: Path) -> Path:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    return path


_COMMANDS = [["list"], ["freeze", "*"], ["unfreeze", "*"], ["init", "*=zeros"]]


@pytest.mark.parametrize("command", _COMMANDS, ids=[c[0] for c in _COMMANDS])
def test_error_is_one_line_without_debug(command: list[str], corrupt: Path) -> None:
    line = one_error_line(run(command[0], corrupt, *command[1:]))
    assert "not valid JSON" in line


@pytest.mark.parametrize("command", _COMMANDS, ids=[c[0] for c in _COMMANDS])
def test_debug_shows_traceback(command: list[str], corrupt: Path) -> None:
    result = run(command[0], corrupt, *command[1:], "--debug")
    assert result.returncode == 1, result.stderr
    assert "Traceback (most recent call last)" in result.stderr
    assert "CorruptFileError" in result.stderr and "not valid JSON" in result.stderr


def test_apply_error_one_line_and_debug(corrupt: Path, tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nfreeze = ["*"]\n')
    one_error_line(run("apply", corrupt, rules))
    assert "Traceback" in run("apply", corrupt, rules, "--debug").stderr


def test_write_error_debug_traceback(sample: Callable[[str], Path]) -> None:
    path = sample("mlp.pt")
    before = path.read_bytes()
    quiet = run("freeze", path, "*", preexec=_fsize_limit(len(before) // 2))
    assert "file too large" in one_error_line(quiet)
    loud = run("freeze", path, "*", "--debug", preexec=_fsize_limit(len(before) // 2))
    assert loud.returncode == 1
    assert "Traceback (most recent call last)" in loud.stderr and "WriteError" in loud.stderr
    assert path.read_bytes() == before
    assert temps(path.parent) == []
