"""Every command has help with a worked example, and the README documents every command."""

from __future__ import annotations

import pytest
from helpers import REPO, run_inproc

COMMANDS = ["list", "freeze", "unfreeze", "init", "apply", "mem"]


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_has_an_example(capsys: pytest.CaptureFixture[str], command: str) -> None:
    res = run_inproc(capsys, command, "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"Usage: paramctl {command} ")
    assert f"paramctl {command} " in res.stdout.split("Example", 1)[1]


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    res = run_inproc(capsys, "--help")
    assert res.returncode == 0
    for command in COMMANDS:
        assert f"  {command} " in res.stdout
    assert "Exit codes" in res.stdout


def test_readme_documents_every_command() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for command in COMMANDS:
        assert f"paramctl {command} " in readme
