"""Shared fixtures: real sample checkpoints built once per session, copied per test."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from helpers import run_cli  # noqa: E402

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


@pytest.fixture
def cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    return run_cli
