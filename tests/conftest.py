"""Shared fixtures: real sample checkpoints built once per session, copied per test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sample_models.make_checkpoints import make_all  # noqa: E402


@pytest.fixture(scope="session")
def samples_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only originals: mlp/cnn/transformer/llama as .pt and .safetensors, and
    transformer_nested.pt (model + optimizer + epoch + config). Never modify these."""
    out = tmp_path_factory.mktemp("samples")
    make_all(out, seed=0)
    return out


@pytest.fixture
def sample(samples_dir: Path, tmp_path: Path) -> Callable[[str], Path]:
    """``sample("mlp.pt")`` -> a private copy in this test's tmp_path, safe to rewrite."""

    def copy(name: str) -> Path:
        dst = tmp_path / name
        shutil.copyfile(samples_dir / name, dst)
        return dst

    return copy


def run_cli(*args: str | os.PathLike[str], input: str | None = None,
            cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python -m paramctl`` in a subprocess (real exit codes, real stdout/stderr)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "paramctl", *map(str, args)],
        input=input, capture_output=True, text=True, cwd=cwd or REPO, env=full_env,
        timeout=timeout,
    )


@pytest.fixture
def cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    return run_cli
