"""What every command shares: option types, output format choice, error handling."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from paramctl.errors import ParamctlError, UsageError
from paramctl.fastcli import one_line, output_format

__all__ = ["handle_errors", "one_line", "options", "output_format", "parse_size",
           "progress_for", "read_names", "warn"]

if TYPE_CHECKING:
    from paramctl.render.text import ProgressBar

SourceArg = Annotated[str, typer.Argument(
    help="Checkpoint (.pt .pth .bin .ckpt .safetensors), sharded index or folder, DCP folder, "
         "or module path pkg.mod:attr / file.py:attr.", show_default=False)]
KeyOpt = Annotated[str | None, typer.Option(
    "--key", help="Checkpoint entry holding the state dict (dotted for nesting).")]
StripOpt = Annotated[str | None, typer.Option(
    "--strip-prefix", help="Show names without this prefix (e.g. 'module.').")]
ArgOpt = Annotated[list[str] | None, typer.Option(
    "--arg", help="key=value keyword argument for a module path (repeatable).")]
WeightsOpt = Annotated[Path | None, typer.Option(
    "--weights", help="Load this checkpoint into a module-path source.")]
UnsafeOpt = Annotated[bool, typer.Option(
    "--unsafe-load", help="Allow unpickling arbitrary objects (runs code from the file).")]
QuietOpt = Annotated[bool, typer.Option("-q", "--quiet", help="Print only errors.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]
HeadersOpt = Annotated[bool | None, typer.Option(
    "--headers/--no-headers", help="Header row (and table footer); tsv has none by default.",
    show_default=False)]
OutOpt = Annotated[Path | None, typer.Option(
    "-o", "--output", help="Write here instead of replacing SOURCE (.pt or .safetensors).")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Show what would change; write "
                                         "nothing.")]
AllowEmptyOpt = Annotated[bool, typer.Option(
    "--allow-empty", help="A pattern that matches nothing is not an error.")]
ShardOpt = Annotated[str | None, typer.Option(
    "--max-shard-size", help="With -o FOLDER: split into sharded safetensors of at most this "
    "size (e.g. 5GB, 500MB).")]
ExcludeOpt = Annotated[list[str] | None, typer.Option(
    "--exclude", "-x", help="Remove matches of this pattern (repeatable); wins over includes.")]


def options(key: str | None, args: list[str] | None, weights: Path | None, unsafe: bool,
            buffers: bool = False) -> Any:
    from paramctl.sources.base import OpenOptions
    from paramctl.sources.module import parse_args

    if unsafe:
        warn("--unsafe-load: pickled objects in the checkpoint may run code on this machine")
    return OpenOptions(key=key, args=parse_args(args or []), weights=weights,
                       unsafe_load=unsafe, buffers=buffers)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | None) -> int | None:
    """``5GB`` -> 5_000_000_000, ``512MiB`` -> 536_870_912."""
    if text is None:
        return None
    raw = text.strip().upper().replace(" ", "")
    number = raw.rstrip("KMGTIB")
    unit = raw[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1
    if unit not in _UNITS or value <= 0:
        raise UsageError(f"--max-shard-size {text!r}: expected a size like 5GB or 500MiB")
    return int(value * _UNITS[unit])


def warn(message: str) -> None:
    sys.stderr.write(f"warning: {message}\n")


def read_names(source: str | None) -> list[str]:
    """Names one per line from a file or ``-`` (stdin); blank lines and ``#`` skipped."""
    if source is None:
        return []
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read --names-from {source}: {exc}") from None
    names = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            names.append(line.split("\t", 1)[0])
    return names


@contextlib.contextmanager
def handle_errors(debug: bool) -> Iterator[None]:
    """Turn :class:`ParamctlError` into ``error: ...`` and its exit code."""
    try:
        yield
    except ParamctlError as exc:
        if debug or os.environ.get("PARAMCTL_DEBUG"):
            raise
        sys.stderr.write(f"error: {one_line(str(exc))}\n")
        raise typer.Exit(exc.exit_code) from None


def progress_for(label: str, quiet: bool) -> ProgressBar:
    from paramctl.render.text import ProgressBar

    return ProgressBar(label, not quiet)

