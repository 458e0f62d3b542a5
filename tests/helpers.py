"""Helpers shared by the test modules (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import hashlib
import os
import signal
import struct
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: object, input: str | None = None, cwd: Path | None = None,
            env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python -m paramctl`` in a subprocess (real exit codes, real stdout/stderr)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "paramctl", *map(str, args)],
        input=input, capture_output=True, text=True, cwd=cwd or REPO, env=full_env,
        timeout=timeout,
    )


def run_inproc(capsys: pytest.CaptureFixture[str],
               *args: object) -> subprocess.CompletedProcess[str]:
    """The real CLI entry point in this process (saves a torch import per call)."""
    from paramctl.cli import main

    # main() installs SIGPIPE/SIGXFSZ handlers for a real process; put pytest's back.
    saved = {s: signal.getsignal(s) for s in (signal.SIGPIPE, signal.SIGXFSZ)}
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    out = capsys.readouterr()
    return subprocess.CompletedProcess([str(a) for a in args], code, out.out, out.err)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_state(folder: Path) -> dict[str, tuple[str, int, int]]:
    """name -> (content hash, mtime_ns, mode) for everything in ``folder``."""
    out = {}
    for entry in sorted(folder.iterdir()):
        st = entry.lstat()
        digest = sha(entry) if entry.is_file() and not entry.is_symlink() else "-"
        out[entry.name] = (digest, st.st_mtime_ns, st.st_mode)
    return out


def one_error_line(res: subprocess.CompletedProcess[str], *,
                   ignore_warnings: bool = False) -> str:
    """The single ``error: ...`` line on stderr (no traceback); ``warning:`` lines are
    skipped when ``ignore_warnings``."""
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    if ignore_warnings:
        lines = [ln for ln in lines if not ln.startswith("warning: ")]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: "), res.stderr
    return lines[0]


def list_json_in_fresh_python(target: Path) -> subprocess.CompletedProcess[str]:
    """``paramctl list TARGET -f json`` in a new interpreter that then reports on stderr
    ``RESULT <exit code> <torch modules imported>`` (``RESULT 0 []`` when torch-free)."""
    script = (
        "import os, sys, runpy\n"
        # `list` leaves with os._exit (no interpreter teardown); the probe has more to do.
        "def _exit(code):\n"
        "    raise SystemExit(code)\n"
        "os._exit = _exit\n"
        f"sys.argv = ['paramctl', 'list', {str(target)!r}, '-f', 'json']\n"
        "try:\n"
        "    runpy.run_module('paramctl', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] == 'torch')\n"
        "sys.stderr.write('RESULT %r %r\\n' % (code, heavy[:5]))\n"
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                          timeout=60)


# -- GGUF files byte by byte (malformed and fuzz tests build headers no writer would) -----
def gguf_str(text: str | bytes, *, length: int | None = None, order: str = "<") -> bytes:
    """A GGUF string: u64 length (``length`` overrides it) and the bytes."""
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack(order + "Q", len(raw) if length is None else length) + raw


def gguf_kv(key: str | bytes, vtype: int, payload: bytes, *, order: str = "<") -> bytes:
    """One metadata pair; ``payload`` is the value already encoded."""
    return gguf_str(key, order=order) + struct.pack(order + "I", vtype) + payload


def gguf_tensor(name: str | bytes, ne: tuple[int, ...], ggml_type: int, offset: int, *,
                n_dims: int | None = None, order: str = "<") -> bytes:
    """One tensor info; ``ne`` in file order (row length first)."""
    return (gguf_str(name, order=order)
            + struct.pack(order + "I", len(ne) if n_dims is None else n_dims)
            + struct.pack(f"{order}{len(ne)}Q", *ne)
            + struct.pack(order + "IQ", ggml_type, offset))


def gguf_bytes(kvs: Sequence[bytes] = (), tensors: Sequence[bytes] = (), data: bytes = b"",
               *, version: int = 3, n_tensors: int | None = None, n_kv: int | None = None,
               alignment: int = 32, order: str = "<") -> bytes:
    """A GGUF file: header, the pairs, the tensor infos, padding, then ``data``."""
    head = b"GGUF" + struct.pack(order + "IQQ", version,
                                 len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + b"\0" * (-len(body) % alignment) + data
