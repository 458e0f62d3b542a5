"""What every command shares: option types, output format choice, error handling."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO

import typer

from paramctl.errors import ParamctlError, ParamctlWarning, UsageError
from paramctl.fastcli import OutputError, one_line, output_format, result_output, warn

__all__ = ["OutputError", "handle_errors", "one_line", "options", "output_format",
           "parse_size", "progress_for", "read_names", "report_change", "report_write",
           "result_output", "warn"]

if TYPE_CHECKING:
    from paramctl.model import ChangeResult
    from paramctl.render.text import ProgressBar

SourceArg = Annotated[str, typer.Argument(
    help="Checkpoint (.pt .pth .bin .ckpt .safetensors .gguf), sharded index or folder, DCP "
         "folder, module path pkg.mod:attr / file.py:attr, or a remote file (read-only): "
         "https://HOST/PATH, hf://ORG/REPO[@REV][/PATH].", show_default=False)]
KeyOpt = Annotated[str | None, typer.Option(
    "--key", help="Checkpoint entry holding the state dict (dotted for nesting).")]
StripOpt = Annotated[list[str] | None, typer.Option(
    "--strip-prefix", help="Show names without this prefix: 'module' strips 'module.' "
    "(repeatable, applied in order: --strip-prefix _orig_mod --strip-prefix module).")]
ArgOpt = Annotated[list[str] | None, typer.Option(
    "--arg", help="key=value keyword argument for a module path (repeatable).")]
WeightsOpt = Annotated[Path | None, typer.Option(
    "--weights", help="Load this checkpoint into a module-path source.")]
UnsafeOpt = Annotated[bool, typer.Option(
    "--unsafe-load", help="Allow unpickling arbitrary objects (runs code from the file).")]
QuietOpt = Annotated[bool, typer.Option(
    "-q", "--quiet", help="Print only errors: no report, no warnings, no 'wrote PATH'.")]
WaitOpt = Annotated[float, typer.Option(
    "--wait", metavar="SECONDS", min=0,
    help="If another paramctl is rewriting the file, wait up to SECONDS for it to finish "
    "instead of failing at once.")]
ForceOpt = Annotated[bool, typer.Option(
    "--force", help="Rewrite a read-only file in place (its mode is kept).")]
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


CHANGES_OUTPUT = """
Output: a table on a terminal, else TSV with no header (--headers adds one), one changed
tensor a line: name, action, via (the tied name that pulled it in, else empty),
requires_grad_before, requires_grad_after. Tabs, newlines and backslashes in names are
escaped as \\t, \\n, \\\\. 'wrote PATH' follows on stderr (not with -q).
"""


def options(key: str | None, args: list[str] | None, weights: Path | None, unsafe: bool,
            buffers: bool = False, *, quiet: bool = False) -> Any:
    from paramctl.sources.base import OpenOptions
    from paramctl.sources.module import parse_args

    if unsafe and not quiet:
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


def read_names(source: str | None) -> list[str]:
    """Names one per line from a file or ``-`` (stdin); blank lines and ``#`` skipped.

    The first tab-separated field of each line is the name, with ``\\t``, ``\\n`` and
    ``\\\\`` unescaped as ``list -f names``/``tsv`` escape them (so their output feeds back in).
    """
    from paramctl.render.machine import unescape_field

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
            names.append(unescape_field(line.split("\t", 1)[0]))
    return names


@contextlib.contextmanager
def handle_errors(debug: bool, quiet: bool = False) -> Iterator[None]:
    """Turn :class:`ParamctlError` into ``error: ...`` and its exit code, and the library's
    :class:`ParamctlWarning` into a ``warning: ...`` line (none with ``quiet``)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("always", ParamctlWarning)
        original = warnings.showwarning

        def route(message: Warning | str, category: type[Warning], *args: Any,
                  **kwargs: Any) -> None:
            if not issubclass(category, ParamctlWarning):
                original(message, category, *args, **kwargs)
            elif not quiet:
                warn(str(message))

        warnings.showwarning = route
        try:
            yield
        except ParamctlError as exc:
            if debug or os.environ.get("PARAMCTL_DEBUG"):
                raise
            sys.stderr.write(f"error: {one_line(str(exc))}\n")
            raise typer.Exit(exc.exit_code) from None


def report_write(warnings: Sequence[str], written: Path | None, quiet: bool,
                 render: Callable[[TextIO], None]) -> None:
    """What a write command prints once it is done: its warnings and ``wrote PATH`` on
    stderr (even with stdout piped), then ``render``'s report on stdout; nothing with
    ``quiet``."""
    if quiet:
        return
    for message in warnings:
        warn(message)
    if written is not None:
        sys.stderr.write(f"wrote {one_line(str(written))}\n")
    with result_output(written) as stdout:
        render(stdout)


def report_change(result: ChangeResult, fmt: str, *, dry_run: bool, headers: bool | None,
                  quiet: bool) -> None:
    """:func:`report_write` for freeze, unfreeze, init and apply."""
    from paramctl.render import render_changes

    report_write(result.warnings, result.written, quiet, lambda stdout: render_changes(
        result, fmt, stdout, dry_run=dry_run,
        headers=headers if headers is not None else fmt != "tsv"))


def progress_for(label: str, quiet: bool) -> ProgressBar:
    from paramctl.render.text import ProgressBar

    return ProgressBar(label, not quiet)

