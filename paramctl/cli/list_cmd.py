"""``paramctl list``: what a model or checkpoint holds."""

from __future__ import annotations

import sys
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
    output_format,
)
from paramctl.errors import UsageError

EXAMPLES = """
Examples:

\b
  paramctl list ckpt.pt --trainable
  paramctl list model.safetensors -f json | jq '.totals'
  paramctl list sample_models/mlp.py:MLP --arg hidden=64 --tree
  paramctl list ckpt.pt 'encoder.*' '!*.bias' -f names
  paramctl list ckpt.pt -f html > model.html
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
        "-f", "--format", help="table, tsv, json, jsonl, names, html (a page with a treemap "
        "and a table) or svg (the treemap) (default: table on a terminal, tsv otherwise).",
        show_default=False)] = None,
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
    from paramctl.core import inspect
    from paramctl.render import LIST_FORMATS, PICTURE_FORMATS, render_inventory, render_tree

    with handle_errors(debug):
        if trainable and frozen:
            raise UsageError("--trainable and --frozen exclude each other")
        if depth is not None and not tree:
            raise UsageError("--depth applies to --tree")
        kind = output_format(fmt, LIST_FORMATS)
        if kind in PICTURE_FORMATS and (tree or depth is not None):
            raise UsageError(f"-f {kind} always draws the module tree; drop "
                             f"{'--tree' if tree else '--depth'}")
        inv = inspect(source, patterns or [], excludes=exclude or [],
                      options=options(key, arg, Path(weights) if weights else None,
                                      unsafe_load, buffers),
                      prefix=strip_prefix, trainable=True if trainable else False if frozen
                      else None, allow_empty=allow_empty)
        show_headers = headers if headers is not None else kind != "tsv"
        if tree:
            render_tree(inv, kind, sys.stdout, depth=depth, headers=show_headers, width=width)
        else:
            render_inventory(inv, kind, sys.stdout, headers=show_headers, width=width)
