"""``paramctl init`` and ``paramctl apply``: re-initialise by rule, or run a rules file."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from paramctl.cli.common import (
    CHANGES_OUTPUT,
    AllowEmptyOpt,
    ArgOpt,
    DebugOpt,
    DryRunOpt,
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
    report_change,
)
from paramctl.errors import UsageError

if TYPE_CHECKING:
    from paramctl.rules import Step

INIT_EXAMPLES = """
Examples:

\b
  paramctl init ckpt.pt '*.bias=zeros' 'blocks.*.mlp.*.weight=normal(std=0.02)' --seed 0
  paramctl init model.safetensors '*.mlp.*.weight=kaiming_uniform(a=2.23)' -o reset.safetensors
  paramctl init ckpt.pt 'lm_head=trunc_normal(std=0.02)' --dry-run
""" + CHANGES_OUTPUT

APPLY_EXAMPLES = """
Example rules.toml:

\b
  [[rule]]
  freeze = ["blocks.*"]
  exclude = ["blocks.1.*"]
  [[rule]]
  init = "blocks.1.mlp.*.weight=trunc_normal(std=0.02)"

and the command:

\b
  paramctl apply ckpt.pt rules.toml --seed 1 -o tuned.pt
""" + CHANGES_OUTPUT

SeedOpt = Annotated[int | None, typer.Option(
    "--seed", help="Make each tensor a function of (seed, name, rule) alone.")]
FormatOpt = Annotated[str | None, typer.Option(
    "-f", "--format", help="How to print the plan: table, tsv, json, jsonl, names.",
    show_default=False)]


StepsFactory = Callable[[], tuple[list["Step"], int | None]]


def _run(source: str, steps_from: StepsFactory, seed: int | None, out: Path | None,
         dry_run: bool, allow_empty: bool, fmt: str | None, headers: bool | None, key: str | None,
         strip_prefix: list[str] | None, arg: list[str] | None, weights: Path | None,
         unsafe_load: bool, quiet: bool, debug: bool, max_shard_size: str | None,
         force: bool, wait: float) -> None:
    from paramctl.core import change, check_writable
    from paramctl.render import FORMATS

    with handle_errors(debug, quiet):
        shown = output_format(fmt, FORMATS)
        check_writable(source, dry_run)  # before the rules (parsing them imports torch)
        steps, file_seed = steps_from()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Under torchrun every rank must compute the same tensors; only rank 0 prints.
            if seed is None and file_seed is None:
                raise UsageError("running under torchrun: pass --seed N so that every rank "
                                 "initialises the same values")
            quiet = quiet or os.environ.get("RANK", "0") != "0"
        bar = progress_for("writing", quiet)
        try:
            result = change(source, steps,
                            options=options(key, arg, weights, unsafe_load, quiet=quiet),
                            prefix=strip_prefix, out=out, dry_run=dry_run,
                            allow_empty=allow_empty,
                            seed=seed if seed is not None else file_seed, progress=bar,
                            max_shard_size=parse_size(max_shard_size), force=force, wait=wait)
        finally:
            bar.close()
        report_change(result, shown, dry_run=dry_run, headers=headers, quiet=quiet)


def init_command(
    source: SourceArg,
    rules: Annotated[list[str] | None, typer.Argument(
        help="PATTERN=FN or PATTERN=FN(arg=value, ...), FN from torch.nn.init without the "
             "trailing underscore.", show_default=False)] = None,
    seed: SeedOpt = None,
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
    """Re-initialise what each rule selects with a torch.nn.init function, and save."""

    def steps() -> tuple[list[Step], int | None]:
        from paramctl.rules import parse_init_rule, steps_from_rules

        if not rules:
            raise UsageError("give at least one RULE, e.g. '*.bias=zeros'")
        return list(steps_from_rules([parse_init_rule(r) for r in rules])), None

    _run(source, steps, seed, output, dry_run, allow_empty, fmt, headers, key, strip_prefix,
         arg, weights, unsafe_load, quiet, debug, max_shard_size, force, wait)


def apply_command(
    source: SourceArg,
    rules_file: Annotated[Path, typer.Argument(
        help="TOML file of [[rule]] tables (freeze, unfreeze or init, with exclude).",
        show_default=False)],
    seed: SeedOpt = None,
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
    """Apply an ordered TOML rules file (freeze, unfreeze, init) in one load and one save."""

    def steps() -> tuple[list[Step], int | None]:
        from paramctl.rules import load_rules_file

        loaded, file_seed = load_rules_file(rules_file)
        return list(loaded), file_seed

    _run(source, steps, seed, output, dry_run, allow_empty, fmt, headers, key, strip_prefix,
         arg, weights, unsafe_load, quiet, debug, max_shard_size, force, wait)
