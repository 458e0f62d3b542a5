"""``paramctl list``: what a model or checkpoint holds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from paramctl.cli.common import (
    AllowEmptyOpt,
    ArgOpt,
    DebugOpt,
    ExcludeOpt,
    HeadersOpt,
    KeyOpt,
    SourceArg,
    StripOpt,
    UnsafeOpt,
    WeightsOpt,
    handle_errors,
    options,
)
from paramctl.fastcli import run_list

EXAMPLES = """
Examples:

\b
  paramctl list ckpt.pt --trainable
  paramctl list model.safetensors -f json | jq '.totals'
  paramctl list sample_models/mlp.py:MLP --arg hidden=64 --tree
  paramctl list ckpt.pt 'blocks.*' '!*.bias' -f names
  paramctl list ckpt.pt --summary
  paramctl list ckpt.pt -f html > model.html
  paramctl list lora.pt --trainable -x '*lora_*' --fail-if-any

TSV (the default when piped): name, shape (2048x2048), dtype, numel, requires_grad
(true/false), tied (the other names of its tied group joined with ',', empty when untied);
no header unless --headers. Tabs, newlines and backslashes in names are escaped as \\t, \\n,
\\\\ in tsv and names output; JSON carries names as they are.

--summary prints PEFT's line: 'trainable params: N || all params: M || trainable%: P'.
"all params" is the listing's numel total: tied tensors once, buffers and integer tensors
included (a checkpoint's running_mean, num_batches_tracked...; PEFT counts parameters only).

--fail-if-any exits 4 when the selection is not empty, after printing it (nothing with -q):
a CI gate, e.g. "nothing but the LoRA adapters trains".
"""

SummaryOpt = Annotated[bool, typer.Option(
    "--summary", help="Print one line, PEFT's: trainable params || all params || trainable%.")]
FailOpt = Annotated[bool, typer.Option(
    "--fail-if-any", help="Exit 4 when anything is selected (a CI check); -q prints nothing.")]


def list_command(
    source: SourceArg,
    patterns: Annotated[list[str] | None, typer.Argument(
        help="Only names matching these patterns ('!PATTERN' excludes).",
        show_default=False)] = None,
    trainable: Annotated[bool, typer.Option("--trainable", help="Only trainable.")] = False,
    frozen: Annotated[bool, typer.Option("--frozen", help="Only frozen.")] = False,
    buffers: Annotated[bool, typer.Option(
        "--buffers", help="Include buffers (module paths).")] = False,
    tree: Annotated[bool, typer.Option("--tree", help="Roll up by module.")] = False,
    depth: Annotated[int | None, typer.Option(
        "--depth", min=1, help="Tree depth (with --tree).")] = None,
    fmt: Annotated[str | None, typer.Option(
        "-f", "--format", help="table, tsv, json, jsonl, names, html (a page with a treemap "
        "and a table) or svg (the treemap) (default: table on a terminal, tsv otherwise).",
        show_default=False)] = None,
    headers: HeadersOpt = None,
    summary: SummaryOpt = False,
    fail_if_any: FailOpt = False,
    exclude: ExcludeOpt = None,
    allow_empty: AllowEmptyOpt = False,
    key: KeyOpt = None,
    strip_prefix: StripOpt = None,
    arg: ArgOpt = None,
    weights: WeightsOpt = None,
    unsafe_load: UnsafeOpt = False,
    width: Annotated[int | None, typer.Option(
        "--width", help="Table width (default: the terminal's).", hidden=True)] = None,
    quiet: Annotated[bool, typer.Option(
        "-q", "--quiet", help="No warnings on stderr: only the listing and errors (with "
        "--fail-if-any, not even the listing).")] = False,
    debug: DebugOpt = False,
) -> None:
    """Show a model's or checkpoint's parameters: shapes, dtypes, sizes, requires_grad."""

    with handle_errors(debug, quiet):
        code = run_list(source, patterns or [], trainable=trainable, frozen=frozen, tree=tree,
                        depth=depth, fmt=fmt, headers=headers, exclude=exclude or [],
                        allow_empty=allow_empty, strip_prefix=strip_prefix, width=width,
                        summary=summary, fail_if_any=fail_if_any, quiet=quiet,
                        options=lambda: options(key, arg, Path(weights) if weights else None,
                                                unsafe_load, buffers, quiet=quiet))
        if code:
            raise typer.Exit(code)
