"""``paramctl mem``: what training this model with its current frozen set will cost."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from paramctl.cli.common import (
    ArgOpt,
    DebugOpt,
    KeyOpt,
    SourceArg,
    StripOpt,
    UnsafeOpt,
    WeightsOpt,
    handle_errors,
    options,
    output_format,
    result_output,
)

EXAMPLES = """
Examples:

\b
  paramctl mem sample_models/llama.py:Llama --optimizer adamw --precision bf16-mixed
  paramctl mem sample_models/llama.py:llama_70b --precision bf16-mixed --shards 8 --zero 3
  paramctl mem sample_models.transformer:TinyTransformer --optimizer sgd-momentum -f json
"""


def mem_command(
    source: SourceArg,
    optimizer: Annotated[str, typer.Option(
        "--optimizer", help="adamw, adam, sgd, sgd-momentum, lion, adamw-8bit or adafactor.")]
    = "adamw",
    precision: Annotated[str, typer.Option(
        "--precision", help="fp32, bf16, fp16, bf16-mixed or fp16-mixed.")] = "fp32",
    shards: Annotated[int, typer.Option(
        "--shards", help="Devices the run is split across (data parallel).")] = 1,
    zero: Annotated[int, typer.Option(
        "--zero", help="ZeRO stage with --shards: 1 shards optimizer state and master copy, "
        "2 also gradients, 3 (FSDP full shard) also weights.")] = 0,
    fmt: Annotated[str | None, typer.Option(
        "-f", "--format", help="table or json (default: table).", show_default=False)] = None,
    key: KeyOpt = None,
    strip_prefix: StripOpt = None,
    arg: ArgOpt = None,
    weights: WeightsOpt = None,
    unsafe_load: UnsafeOpt = False,
    quiet: Annotated[bool, typer.Option(
        "-q", "--quiet", help="No warnings on stderr: only the estimate and errors.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Estimate training memory: weights, gradients, master copy, optimizer state.

    Counts the current frozen set; activations are not included.
    """
    from paramctl.core import mem
    from paramctl.render.mem import MEM_FORMATS, render_mem

    with handle_errors(debug, quiet):
        kind = output_format(fmt or "table", MEM_FORMATS)
        opts = options(key, arg, Path(weights) if weights else None, unsafe_load, quiet=quiet)
        est = mem(source, optimizer=optimizer, precision=precision, shards=shards, zero=zero,
                  strip_prefix=strip_prefix, options=opts)
        with result_output() as out:
            render_mem(est, kind, out)
