"""``paramctl freeze`` / ``unfreeze``: set requires_grad by pattern and save."""

from __future__ import annotations

from typing import Annotated

import typer

from paramctl.cli.common import (
    CHANGES_OUTPUT,
    AllowEmptyOpt,
    ArgOpt,
    DebugOpt,
    DryRunOpt,
    ExcludeOpt,
    ForceOpt,
    HeadersOpt,
    KeyOpt,
    OutOpt,
    QuietOpt,
    ShardOpt,
    SourceArg,
    StripOpt,
    UnsafeOpt,
    WaitOpt,
    WeightsOpt,
    handle_errors,
    options,
    output_format,
    parse_size,
    progress_for,
    read_names,
    report_change,
)
from paramctl.errors import UsageError

FREEZE_EXAMPLES = """
Examples:

\b
  paramctl freeze ckpt.pt 'blocks.*' --exclude 'blocks.1'
  paramctl freeze model.safetensors model.embed_tokens -o frozen.safetensors --dry-run
  paramctl list ckpt.pt -f names | grep attn | paramctl freeze ckpt.pt --names-from -
""" + CHANGES_OUTPUT

UNFREEZE_EXAMPLES = """
Examples:

\b
  paramctl unfreeze ckpt.pt 'blocks.1.*'
  paramctl unfreeze model.safetensors '*' -o trainable.safetensors
""" + CHANGES_OUTPUT

PatternsArg = Annotated[list[str] | None, typer.Argument(
    help="Glob, module name or re:REGEX ('!PATTERN' excludes).", show_default=False)]
NamesFromOpt = Annotated[str | None, typer.Option(
    "--names-from", help="Exact names, one per line, from FILE or - (stdin).")]
FormatOpt = Annotated[str | None, typer.Option(
    "-f", "--format", help="How to print the changes: table, tsv, json, jsonl, names.",
    show_default=False)]


def _run(kind: str, source: str, patterns: list[str] | None, exclude: list[str] | None,
         names_from: str | None, out: object, dry_run: bool, allow_empty: bool, fmt: str | None,
         headers: bool | None, key: str | None, strip_prefix: list[str] | None,
         arg: list[str] | None, weights: object, unsafe_load: bool, quiet: bool,
         debug: bool, max_shard_size: str | None = None, force: bool = False,
         wait: float = 0.0) -> None:
    from pathlib import Path

    from paramctl.core import change
    from paramctl.render import FORMATS
    from paramctl.rules import Step

    with handle_errors(debug, quiet):
        exact = read_names(names_from)
        if not patterns and names_from is None:
            raise UsageError(f"give at least one PATTERN to {kind} (or --names-from FILE)")
        if names_from is not None and not exact and not patterns and not allow_empty:
            raise UsageError(f"--names-from {names_from} holds no names")
        shown = output_format(fmt, FORMATS)
        step = Step(kind, patterns=tuple(patterns or ()), excludes=tuple(exclude or ()),
                    exact=tuple(exact))
        opts = options(key, arg, Path(str(weights)) if weights else None, unsafe_load, quiet=quiet)
        bar = progress_for("writing", quiet)
        try:
            result = change(source, [step], options=opts, prefix=strip_prefix,
                            out=Path(str(out)) if out else None, dry_run=dry_run,
                            allow_empty=allow_empty, progress=bar,
                            max_shard_size=parse_size(max_shard_size), force=force, wait=wait)
        finally:
            bar.close()
        report_change(result, shown, dry_run=dry_run, headers=headers, quiet=quiet)


def freeze_command(
    source: SourceArg,
    patterns: PatternsArg = None,
    exclude: ExcludeOpt = None,
    names_from: NamesFromOpt = None,
    output: OutOpt = None,
    max_shard_size: ShardOpt = None,
    dry_run: DryRunOpt = False,
    allow_empty: AllowEmptyOpt = False,
    fmt: FormatOpt = None,
    headers: HeadersOpt = None,
    key: KeyOpt = None,
    strip_prefix: StripOpt = None,
    arg: ArgOpt = None,
    weights: WeightsOpt = None,
    unsafe_load: UnsafeOpt = False,
    force: ForceOpt = False,
    wait: WaitOpt = 0.0,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Freeze (requires_grad=False) what the patterns select, and save it in the file."""
    _run("freeze", source, patterns, exclude, names_from, output, dry_run, allow_empty, fmt,
         headers, key, strip_prefix, arg, weights, unsafe_load, quiet, debug, max_shard_size,
         force, wait)


def unfreeze_command(
    source: SourceArg,
    patterns: PatternsArg = None,
    exclude: ExcludeOpt = None,
    names_from: NamesFromOpt = None,
    output: OutOpt = None,
    max_shard_size: ShardOpt = None,
    dry_run: DryRunOpt = False,
    allow_empty: AllowEmptyOpt = False,
    fmt: FormatOpt = None,
    headers: HeadersOpt = None,
    key: KeyOpt = None,
    strip_prefix: StripOpt = None,
    arg: ArgOpt = None,
    weights: WeightsOpt = None,
    unsafe_load: UnsafeOpt = False,
    force: ForceOpt = False,
    wait: WaitOpt = 0.0,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Unfreeze (requires_grad=True) what the patterns select, and save it in the file."""
    _run("unfreeze", source, patterns, exclude, names_from, output, dry_run, allow_empty, fmt,
         headers, key, strip_prefix, arg, weights, unsafe_load, quiet, debug, max_shard_size,
         force, wait)
