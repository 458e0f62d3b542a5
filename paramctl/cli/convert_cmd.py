"""``paramctl convert``: rename, keep/drop, cast and re-shard in one streaming rewrite."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from paramctl.cli.common import (
    AllowEmptyOpt,
    DebugOpt,
    DryRunOpt,
    ForceOpt,
    HeadersOpt,
    KeyOpt,
    QuietOpt,
    ShardOpt,
    SourceArg,
    StripOpt,
    UnsafeOpt,
    WaitOpt,
    handle_errors,
    options,
    output_format,
    parse_size,
    progress_for,
    report_write,
)

EXAMPLES = """
Examples:

\b
  paramctl convert ddp.pt --rename 'module.=' -o plain.pt
  paramctl convert model.safetensors --cast bfloat16 --no-cast '*norm*' -o model-bf16.safetensors
  paramctl convert ckpt.pt --keep blocks --rename 'blocks.=layers.' -o layers.safetensors
  paramctl convert model.safetensors --drop 'lm_head' --dry-run
  paramctl convert model.safetensors -o shards/ --max-shard-size 2GB
  paramctl convert llama/ --cast bfloat16 -o llama-bf16/
"""

Repeat = list[str] | None


def convert_command(
    source: SourceArg,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="Write here (.pt, .safetensors, or a folder: sharded "
        "safetensors, split by --max-shard-size or as a sharded SOURCE was) instead of "
        "replacing SOURCE.")] = None,
    keep: Annotated[Repeat, typer.Option(
        "--keep", help="Keep only what matches (repeatable; applied first).")] = None,
    drop: Annotated[Repeat, typer.Option(
        "--drop", help="Remove what matches (repeatable).")] = None,
    rename: Annotated[Repeat, typer.Option(
        "--rename", help="FROM=TO: replace a leading prefix ('module.=' strips it), or "
        "re:REGEX=TO (re.sub with \\1 groups); repeatable, in order.")] = None,
    cast: Annotated[str | None, typer.Option(
        "--cast", help="float32, bfloat16 or float16: cast floating-point tensors "
        "(bit for bit what tensor.to() gives).")] = None,
    cast_only: Annotated[Repeat, typer.Option(
        "--cast-only", help="Cast only what matches (names after renaming).")] = None,
    no_cast: Annotated[Repeat, typer.Option(
        "--no-cast", help="Never cast what matches, e.g. '*norm*'.")] = None,
    allow_overflow: Annotated[bool, typer.Option(
        "--allow-overflow", help="Let values beyond float16's range become inf.")] = False,
    max_shard_size: ShardOpt = None,
    dry_run: DryRunOpt = False,
    allow_empty: AllowEmptyOpt = False,
    fmt: Annotated[str | None, typer.Option(
        "-f", "--format", help="How to print the plan: table, tsv, json.",
        show_default=False)] = None,
    headers: HeadersOpt = None,
    key: KeyOpt = None,
    strip_prefix: StripOpt = None,
    unsafe_load: UnsafeOpt = False,
    force: ForceOpt = False,
    wait: WaitOpt = 0.0,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Rename keys, keep or drop tensors, cast dtypes and re-shard, streaming.

    Untouched tensors are copied byte for byte; everything beside the tensors in a torch
    file, and the safetensors metadata, is carried through.
    """
    from paramctl.render.convert import CONVERT_FORMATS, render_convert
    from paramctl.surgery import ConvertPlan, convert

    with handle_errors(debug, quiet):
        kind = output_format(fmt, CONVERT_FORMATS)
        plan = ConvertPlan.parse(keep=keep or (), drop=drop or (), rename=rename or (),
                                 cast=cast, cast_only=cast_only or (), no_cast=no_cast or (),
                                 allow_overflow=allow_overflow)
        bar = progress_for("converting", quiet)
        try:
            result = convert(source, plan, out=output,
                             options=options(key, None, None, unsafe_load),
                             prefix=strip_prefix, max_shard_size=parse_size(max_shard_size),
                             dry_run=dry_run, allow_empty=allow_empty, force=force,
                             wait=wait, progress=bar)
        finally:
            bar.close()
        report_write(result.warnings, result.written, quiet, lambda stdout: render_convert(
            result, kind, stdout, dry_run=dry_run,
            headers=headers if headers is not None else kind != "tsv"))
