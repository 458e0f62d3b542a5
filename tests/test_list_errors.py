"""``paramctl list`` failures: exit code, one ``error: ...`` line on stderr, no traceback.

Every test runs the real CLI in a subprocess (``run_cli``).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers import run_cli

from sample_models.mlp import MLP

REPO = Path(__file__).resolve().parent.parent
Run = subprocess.CompletedProcess[str]


def fails(*args: str | Path, code: int, cwd: Path | None = None) -> str:
    """Run ``paramctl`` expecting exit ``code``; return its single stderr line."""
    return error_line(run_cli(*args, cwd=cwd), code)


def error_line(res: subprocess.CompletedProcess[str], code: int) -> str:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def half_of(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


# -- files -------------------------------------------------------------------------------------
def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.pt"
    assert fails("list", path, code=1) == f"error: no such file: {path}"


def test_missing_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "missing.safetensors"
    assert fails("list", path, code=1) == f"error: no such file: {path}"


def test_missing_file_without_extension(tmp_path: Path) -> None:
    path = tmp_path / "nothing"
    assert fails("list", path, code=1) == f"error: no such file: {path}"


def test_directory(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    line = fails("list", folder, code=1)
    assert line.startswith(f"error: {folder} is a directory")


def test_directory_named_like_a_checkpoint(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt.pt"
    folder.mkdir()
    line = fails("list", folder, code=1)
    assert line.startswith(f"error: {folder} is a directory")


def test_empty_pt(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt"
    path.touch()
    assert fails("list", path, code=1) == f"error: {path}: the file is empty"


def test_empty_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    path.touch()
    assert fails("list", path, code=1) == f"error: {path}: the file is empty"


@pytest.mark.parametrize("name", ["mlp.pt", "transformer_nested.pt"])
def test_truncated_pt(samples_dir: Path, tmp_path: Path, name: str) -> None:
    path = half_of(samples_dir / name, tmp_path / name)
    line = fails("list", path, code=1)
    assert line.startswith(f"error: {path}: ")


def test_pt_missing_its_last_bytes(samples_dir: Path, tmp_path: Path) -> None:
    data = (samples_dir / "cnn.pt").read_bytes()
    path = tmp_path / "cnn.pt"
    path.write_bytes(data[:-10])
    assert fails("list", path, code=1).startswith(f"error: {path}: ")


@pytest.mark.parametrize("keep", [4, 20, None], ids=["4-bytes", "in-header", "half"])
def test_truncated_safetensors(samples_dir: Path, tmp_path: Path, keep: int | None) -> None:
    data = (samples_dir / "mlp.safetensors").read_bytes()
    path = tmp_path / "mlp.safetensors"
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])
    assert fails("list", path, code=1).startswith(f"error: {path}: ")


def test_text_file_named_pt(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    path.write_text("hello, I am not a checkpoint\n")
    assert fails("list", path, code=1) == (
        f"error: {path}: not a torch checkpoint (not a zip archive)")


def test_text_file_named_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_text("hello, I am not a checkpoint either\n")
    assert fails("list", path, code=1).startswith(f"error: {path}: ")


def test_zip_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    import zipfile

    path = tmp_path / "archive.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hello")
    assert fails("list", path, code=1).startswith(f"error: {path}: ")


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_text("weights?\n")
    line = fails("list", path, code=1)
    assert line.startswith(f"error: {path}: unknown checkpoint type")
    assert ".safetensors" in line  # says what would work


def test_key_not_in_checkpoint(samples_dir: Path) -> None:
    path = samples_dir / "transformer_nested.pt"
    line = fails("list", path, "--key", "nope", code=1)
    assert line.startswith("error: --key 'nope' is not in the checkpoint")
    assert "model" in line and "optimizer" in line  # lists what is there


def test_key_on_safetensors(samples_dir: Path) -> None:
    line = fails("list", samples_dir / "mlp.safetensors", "--key", "model", code=1)
    assert "--key" in line


@pytest.mark.parametrize("key", ["config", "optimizer"])
def test_key_without_tensors(samples_dir: Path, key: str) -> None:
    """A --key whose value holds no tensors is an error, as a --key holding an int is."""
    path = samples_dir / "transformer_nested.pt"
    assert fails("list", path, "--key", "epoch", code=1) == (
        f"error: {path}: --key 'epoch' holds a int, not a state dict")
    line = fails("list", path, "--key", key, code=1)
    assert f"'{key}'" in line


def test_key_naming_a_tensor(samples_dir: Path) -> None:
    line = fails("list", samples_dir / "transformer_nested.pt", "--key", "model.embed.weight",
                 code=1)
    path = samples_dir / "transformer_nested.pt"
    assert line == (f"error: {path}: --key 'model.embed.weight' is a single tensor, "
                    "not a state dict")
    assert "TensorRef" not in line  # an internal class name means nothing to a user


def test_legacy_torch_format(tmp_path: Path) -> None:
    """Legacy (pre-1.6) files are listed torch-free; rewriting one in place is refused with
    the way out (write a new file with -o)."""
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    res = run_cli("list", path, "-f", "names")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["w"]
    line = fails("freeze", path, "w", code=2)
    assert line.startswith(f"error: {path} is a legacy")
    assert "-o OUT.pt" in line


def test_weights_that_do_not_fit_the_model(samples_dir: Path,
                                           module_runs: dict[str, Run]) -> None:
    ckpt = samples_dir / "cnn.pt"
    line = error_line(module_runs["weights"], 1)
    assert line.startswith(f"error: --weights {ckpt} does not fit sample_models")
    assert "layers.0.weight" in line and "features.0.weight" in line
    # the advice must be something a CLI user can do: there is no strict=False option
    assert "strict=False" not in line


# -- pickled objects ---------------------------------------------------------------------------
def test_full_pickled_module_is_listed(tmp_path: Path) -> None:
    path = tmp_path / "full.pt"
    torch.save(MLP(), path)
    res = run_cli("list", path, "-f", "names")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [n for n, _ in MLP().named_parameters()]


def test_pickled_module_code_is_never_imported(tmp_path: Path) -> None:
    """A pickled module of the user's class is read structurally: its code is never
    imported (no side effects), even when it is importable from the current folder."""
    pkg = tmp_path / "code"
    pkg.mkdir()
    (pkg / "sidefx_mod.py").write_text(textwrap.dedent("""
        import pathlib

        from torch import nn

        pathlib.Path(__file__).with_name("imported.marker").write_text("imported")


        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(2, 2)
    """))
    sys.path.insert(0, str(pkg))
    try:
        import sidefx_mod  # type: ignore[import-not-found]

        path = tmp_path / "wrapped.pt"
        torch.save({"model": sidefx_mod.Net(), "epoch": 1}, path)
    finally:
        sys.path.remove(str(pkg))
        sys.modules.pop("sidefx_mod", None)
    marker = pkg / "imported.marker"
    marker.unlink()
    res = run_cli("list", path, "-f", "names", cwd=pkg)  # the module is importable from cwd
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["lin.weight", "lin.bias"]
    assert not marker.exists()


# -- module paths ------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["sample_models.mlp:", "a:b:c"])
def test_bad_module_path_syntax(spec: str) -> None:
    line = fails("list", spec, code=1)
    assert repr(spec) in line or spec in line
    # says what a module path looks like, so the user can fix it
    assert re.search(r"pkg\.mod(ule)?:", line), line


def test_module_does_not_exist(module_runs: dict[str, Run]) -> None:
    line = error_line(module_runs["no-module"], 1)
    assert line == ("error: cannot import 'nosuchmod_xyz.models': "
                    "No module named 'nosuchmod_xyz'")


def test_attribute_does_not_exist(module_runs: dict[str, Run]) -> None:
    line = error_line(module_runs["no-attr"], 1)
    assert line == "error: 'sample_models.mlp' has no attribute 'Nope'"


@pytest.fixture(scope="module")
def factories(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("factories") / "factories.py"
    path.write_text(textwrap.dedent("""
        def boom():
            raise RuntimeError("kaboom")


        def not_a_module():
            return 42


        NUMBER = 5
    """))
    return path


@pytest.fixture(scope="module")
def module_runs(factories: Path, samples_dir: Path) -> dict[str, Run]:
    """Failing module-path runs, started together: each subprocess imports torch (a second
    or more), so running them side by side keeps this file fast."""
    cases: dict[str, tuple[str | Path, ...]] = {
        "no-module": ("list", "nosuchmod_xyz.models:Model"),
        "no-attr": ("list", "sample_models.mlp:Nope"),
        "raises": ("list", f"{factories}:boom"),
        "not-module": ("list", f"{factories}:not_a_module"),
        "weights": ("list", "sample_models.mlp:MLP", "--weights", samples_dir / "cnn.pt"),
    }
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        futures = {name: pool.submit(run_cli, *args) for name, args in cases.items()}
    return {name: future.result() for name, future in futures.items()}


def test_factory_that_raises(factories: Path, module_runs: dict[str, Run]) -> None:
    spec = f"{factories}:boom"
    assert error_line(module_runs["raises"], 1) == (
        f"error: building {spec} failed: RuntimeError: kaboom")


def test_factory_returning_non_module(factories: Path, module_runs: dict[str, Run]) -> None:
    spec = f"{factories}:not_a_module"
    line = error_line(module_runs["not-module"], 1)
    assert line.startswith(f"error: {spec} returned a")
    assert "int" in line and "nn.Module" in line


# -- usage -------------------------------------------------------------------------------------
def test_unknown_option(samples_dir: Path) -> None:
    line = fails("list", samples_dir / "mlp.pt", "--bogus", code=2)
    assert line.startswith("error: No such option: --bogus")
    assert "paramctl list --help" in line


def test_trainable_and_frozen(samples_dir: Path) -> None:
    line = fails("list", samples_dir / "mlp.pt", "--trainable", "--frozen", code=2)
    assert line == "error: --trainable and --frozen exclude each other"


def test_unknown_format(samples_dir: Path) -> None:
    line = fails("list", samples_dir / "mlp.pt", "-f", "xml", code=2)
    assert line.startswith("error: unknown format 'xml'")
    assert "json" in line and "tsv" in line


def test_depth_without_tree(samples_dir: Path) -> None:
    assert fails("list", samples_dir / "mlp.pt", "--depth", "1", code=2) == (
        "error: --depth applies to --tree")


def test_bad_regex(samples_dir: Path) -> None:
    line = fails("list", samples_dir / "mlp.pt", "re:(", code=2)
    assert line.startswith("error: invalid regular expression 're:('")


def test_missing_source() -> None:
    line = fails("list", code=2)
    assert "source" in line.lower()


def test_bad_arg_syntax() -> None:
    line = fails("list", "sample_models/mlp.py:MLP", "--arg", "hidden", code=2)
    assert line == "error: --arg 'hidden': expected key=value, e.g. --arg hidden=64"


# -- patterns ----------------------------------------------------------------------------------
def test_pattern_matches_nothing(samples_dir: Path) -> None:
    line = fails("list", samples_dir / "mlp.pt", "layer.*", code=3)
    assert line.startswith("error: pattern 'layer.*' matched no parameter; closest names: ")
    assert "layers.0.weight" in line or "layers.1.weight" in line
    assert "--allow-empty" in line


def test_pattern_matches_nothing_suggests_module(samples_dir: Path) -> None:
    line = fails("list", samples_dir / "transformer.pt", "block", code=3)
    assert line.startswith("error: pattern 'block' matched no parameter; closest names: ")
    assert "blocks" in line


def test_exclude_matches_nothing_is_fine(samples_dir: Path) -> None:
    res = run_cli("list", samples_dir / "mlp.pt", "--exclude", "haed", "-f", "names")
    assert (res.returncode, res.stderr) == (0, "")
    assert res.stdout == run_cli("list", samples_dir / "mlp.pt", "-f", "names").stdout
    assert len(res.stdout.splitlines()) == 6


def test_allow_empty_turns_no_match_into_success(samples_dir: Path) -> None:
    res = run_cli("list", samples_dir / "mlp.pt", "nothing", "--allow-empty", "-f", "names")
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""
    assert res.stderr == ""


# -- every file error says which file ----------------------------------------------------------
def test_every_file_error_names_the_file(samples_dir: Path, tmp_path: Path) -> None:
    """With many files in a script, the message must say which one failed."""
    bad: dict[str, Path] = {}
    bad["empty"] = tmp_path / "empty.pt"
    bad["empty"].touch()
    bad["half-pt"] = half_of(samples_dir / "mlp.pt", tmp_path / "half.pt")
    bad["half-st"] = half_of(samples_dir / "mlp.safetensors", tmp_path / "half.safetensors")
    bad["text"] = tmp_path / "text.pt"
    bad["text"].write_text("nope")
    bad["pickled-object-without-tensors"] = tmp_path / "object.pt"
    torch.save(argparse.Namespace(lr=0.1), bad["pickled-object-without-tensors"])
    bad["legacy-without-tensors"] = tmp_path / "legacy.pt"
    torch.save({"epoch": 3}, bad["legacy-without-tensors"], _use_new_zipfile_serialization=False)
    unnamed = {}
    for label, path in bad.items():
        line = fails("list", path, code=1)
        if str(path) not in line:
            unnamed[label] = line
    assert unnamed == {}
