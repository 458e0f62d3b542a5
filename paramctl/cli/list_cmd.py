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
  paramctl list ckpt.pt 'encoder.*' '!*.bias' -f names
"""


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
        "-f", "--format", help="table, tsv, json, jsonl or names (default: table on a "
        "terminal, tsv otherwise).", show_default=False)] = None,
    headers: HeadersOpt = None,
    exclude: ExcludeOpt = None,
    allow_empty: AllowEmptyOpt = False,
    key: KeyOpt = None,
    strip_prefix: StripOpt = None,
    arg: ArgOpt = None,
    weights: WeightsOpt = None,
    unsafe_load: UnsafeOpt = False,
    width: Annotated[int | None, typer.Option(
        "--width", help="Table width (default: the terminal's).", hidden=True)] = None,
    debug: DebugOpt = False,
) -> None:
    """Show a model's or checkpoint's parameters: shapes, dtypes, sizes, requires_grad."""
    with handle_errors(debug):
        run_list(source, patterns or [], trainable=trainable, frozen=frozen, tree=tree,
                 depth=depth, fmt=fmt, headers=headers, exclude=exclude or [],
                 allow_empty=allow_empty, strip_prefix=strip_prefix, width=width,
                 options=lambda: options(key, arg, Path(weights) if weights else None,
                                         unsafe_load, buffers))
