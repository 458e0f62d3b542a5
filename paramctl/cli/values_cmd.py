"""``paramctl stats`` and ``paramctl diff``: the numbers inside, and what changed."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from paramctl.cli.common import (
    AllowEmptyOpt,
    DebugOpt,
    ExcludeOpt,
    HeadersOpt,
    KeyOpt,
    QuietOpt,
    SourceArg,
    StripOpt,
    UnsafeOpt,
    handle_errors,
    options,
    output_format,
    result_output,
)

STATS_EXAMPLES = """
Examples:

\b
  paramctl stats model.safetensors
  paramctl stats ckpt.pt '*.weight' --check
  paramctl stats model.safetensors -f json | jq '.totals'
"""

DIFF_EXAMPLES = """
Examples:

\b
  paramctl diff base.safetensors tuned.safetensors
  paramctl diff base.safetensors tuned.pt --structure-only --all
  paramctl diff base.safetensors tuned.safetensors --exit-code -q || echo "weights changed"
"""

PatternsArg = Annotated[list[str] | None, typer.Argument(
    help="Only names matching these patterns ('!PATTERN' excludes).", show_default=False)]
JobsOpt = Annotated[int | None, typer.Option(
    "--jobs", "-j", min=1, help="Processes to split the tensors over (default: both cores "
    "for large inputs).")]


def _printing_rank() -> bool:
    """Under torchrun every rank computes a share; only rank 0 prints the merged result."""
    return int(os.environ.get("WORLD_SIZE", "1")) <= 1 or os.environ.get("RANK", "0") == "0"


def stats_command(
    source: SourceArg,
    patterns: PatternsArg = None,
    exclude: ExcludeOpt = None,
    check: Annotated[bool, typer.Option(
        "--check", help="Exit 4 when a selected tensor holds a NaN or an Inf.")] = False,
    fmt: Annotated[str | None, typer.Option(
        "-f", "--format", help="table, tsv, json or jsonl (default: table on a terminal, "
        "tsv otherwise).", show_default=False)] = None,
    headers: HeadersOpt = None,
    allow_empty: AllowEmptyOpt = False,
    key: KeyOpt = None,
    strip_prefix: StripOpt = None,
    unsafe_load: UnsafeOpt = False,
    jobs: JobsOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Per-tensor min, max, mean, std, l2 and zero/NaN/Inf counts, in float64.

    min/max/mean/std (population) and l2 are over the finite values; quantised GGUF
    tensors are listed but not decoded.
    """
    from paramctl.render.values import STATS_FORMATS, render_stats
    from paramctl.values import stats

    with handle_errors(debug, quiet):
        kind = output_format(fmt, STATS_FORMATS)
        result = stats(source, patterns or [], excludes=exclude or [],
                       options=options(key, None, None, unsafe_load), prefix=strip_prefix,
                       allow_empty=allow_empty, jobs=jobs)
        if not _printing_rank():
            return
        if not quiet:
            with result_output() as stdout:
                render_stats(result, kind, stdout,
                             headers=headers if headers is not None else kind != "tsv")
        bad = result.nonfinite
        if check and bad:
            names = ", ".join(r.name for r in bad[:5]) + (", ..." if len(bad) > 5 else "")
            sys.stderr.write(f"error: {len(bad)} tensor{'s' if len(bad) != 1 else ''} hold "
                             f"NaN or Inf values: {names}\n")
            raise typer.Exit(4)


def diff_command(
    a: Annotated[str, typer.Argument(help="The first checkpoint (any source).",
                                     show_default=False)],
    b: Annotated[str, typer.Argument(help="The second checkpoint (any source).",
                                     show_default=False)],
    patterns: PatternsArg = None,
    exclude: ExcludeOpt = None,
    show_all: Annotated[bool, typer.Option(
        "--all", help="Also show unchanged names (table and tsv).")] = False,
    structure_only: Annotated[bool, typer.Option(
        "--structure-only", help="Compare names, shapes, dtypes and flags only; read no "
        "tensor data.")] = False,
    exit_code: Annotated[bool, typer.Option(
        "--exit-code", help="Exit 4 when anything differs.")] = False,
    fmt: Annotated[str | None, typer.Option(
        "-f", "--format", help="table, tsv, json, jsonl or html (default: table on a "
        "terminal, tsv otherwise).", show_default=False)] = None,
    headers: HeadersOpt = None,
    allow_empty: AllowEmptyOpt = False,
    key: KeyOpt = None,
    strip_prefix: StripOpt = None,
    unsafe_load: UnsafeOpt = False,
    jobs: JobsOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Pair the tensors of A and B by name: added, removed, shape, dtype, changed, same.

    For changed tensors: max |a-b|, ||a-b||/||a|| and cosine similarity, in float64.
    requires_grad is compared separately.
    """
    from paramctl.render.values import DIFF_FORMATS, render_diff
    from paramctl.values import diff

    with handle_errors(debug, quiet):
        kind = output_format(fmt, DIFF_FORMATS)
        opts = options(key, None, None, unsafe_load)
        result = diff(a, b, patterns or [], excludes=exclude or [],
                      structure_only=structure_only, options_a=opts, options_b=opts,
                      prefix=strip_prefix, allow_empty=allow_empty, jobs=jobs)
        if not _printing_rank():
            return
        if not quiet:
            with result_output() as stdout:
                render_diff(result, kind, stdout, show_all=show_all,
                            headers=headers if headers is not None else kind != "tsv")
        if exit_code and result.differs:
            raise typer.Exit(4)
