"""The Python API for training code: weights plus frozen flags, and in-memory edits."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from paramctl.errors import UsageError
from paramctl.patterns import select
from paramctl.rules import InitRule, Step, load_rules_file, parse_init_rule, run_init
from paramctl.weights import (
    LoadResult,
    apply_frozen,
    describe_mismatch,
    frozen_names,
    load_state_dict,
    tied_names,
)
from paramctl.writers.module import save_module

if TYPE_CHECKING:
    from torch import nn

    from paramctl.surgery import ConvertResult

__all__ = [
    "LoadResult",
    "apply_frozen",
    "apply_rules",
    "convert",
    "describe_mismatch",
    "freeze",
    "frozen_names",
    "init_params",
    "load_state_dict",
    "save_module",
    "unfreeze",
]


def _set_trainable(model: nn.Module, patterns: Sequence[str], excludes: Sequence[str],
                   trainable: bool, allow_empty: bool) -> list[str]:
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    chosen = set(select(names, patterns, excludes, allow_empty=allow_empty, default_all=False))
    changed = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in chosen and (p.is_floating_point() or p.is_complex()):
            if p.requires_grad != trainable:
                changed.append(name)
            p.requires_grad_(trainable)
    return changed


def freeze(model: nn.Module, patterns: Sequence[str] | str, *, excludes: Sequence[str] = (),
           allow_empty: bool = False) -> list[str]:
    """Set ``requires_grad=False`` on matching parameters; returns the names changed.

    >>> paramctl.freeze(model, ["backbone.*"], excludes=["backbone.layer4"])  # doctest: +SKIP
    """
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    return _set_trainable(model, pats, excludes, False, allow_empty)


def unfreeze(model: nn.Module, patterns: Sequence[str] | str, *,
             excludes: Sequence[str] = (), allow_empty: bool = False) -> list[str]:
    """Set ``requires_grad=True`` on matching parameters; returns the names changed."""
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    return _set_trainable(model, pats, excludes, True, allow_empty)


def _init_steps(model: nn.Module, steps: Sequence[Step], seed: int | None,
                allow_empty: bool) -> list[str]:
    import torch

    params = dict(model.named_parameters(remove_duplicate=False))
    tied = tied_names(model)
    names = list(params)
    done: list[str] = []
    for step in steps:
        if step.kind == "init":
            for rule in step.rules:
                chosen = select(names, [rule.pattern], step.excludes, allow_empty=allow_empty,
                                default_all=False)
                seen: set[int] = set()
                for name in chosen:
                    p = params[name]
                    if id(p) in seen:
                        continue
                    seen.add(id(p))
                    if not (p.is_floating_point() or p.is_complex()):
                        raise UsageError(f"cannot initialise {name} ({p.dtype}): not floating")
                    # A tied group is one tensor, seeded by its first name in sorted order,
                    # exactly as the file writers do, whichever name was selected.
                    with torch.no_grad():
                        run_init(rule, min(tied[name]), p.data, seed)
                    done.extend(tied[name])
        else:
            _set_trainable(model, step.patterns, step.excludes, step.kind == "unfreeze",
                           allow_empty)
    return list(dict.fromkeys(done))


def init_params(model: nn.Module, rules: Sequence[str | InitRule], *, seed: int | None = None,
                allow_empty: bool = False) -> list[str]:
    """Re-initialise parameters in place by ``PATTERN=FN(...)`` rules; returns names touched.

    >>> paramctl.init_params(model, ["head.*.weight=normal(std=0.02)", "*.bias=zeros"],
    ...                      seed=0)  # doctest: +SKIP
    """
    parsed = [r if isinstance(r, InitRule) else parse_init_rule(r) for r in rules]
    steps = [Step("init", rules=(r,), where=r.text) for r in parsed]
    return _init_steps(model, steps, seed, allow_empty)


def apply_rules(model: nn.Module, rules: str | os.PathLike[str] | Sequence[Step], *,
                seed: int | None = None, allow_empty: bool = False) -> list[str]:
    """Apply a TOML rules file (or parsed steps) to an in-memory module, in order.

    >>> paramctl.apply_rules(model, "rules.toml", seed=1)  # doctest: +SKIP
    """
    if isinstance(rules, str | os.PathLike):
        steps, file_seed = load_rules_file(Path(rules))
        seed = seed if seed is not None else file_seed
    else:
        steps = list(rules)
    return _init_steps(model, steps, seed, allow_empty)


def convert(source: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
            keep: Sequence[str] = (), drop: Sequence[str] = (), rename: Sequence[str] = (),
            cast: str | None = None, cast_only: Sequence[str] = (),
            no_cast: Sequence[str] = (), allow_overflow: bool = False,
            max_shard_size: int | None = None, dry_run: bool = False,
            key: str | None = None) -> ConvertResult:
    """Rename, keep/drop, cast or re-shard a checkpoint in one streaming rewrite.

    >>> paramctl.convert("ddp.pt", "plain.pt", rename=["module.="])  # doctest: +SKIP
    >>> paramctl.convert("model.safetensors", "bf16.safetensors", cast="bfloat16",
    ...                  no_cast=["*norm*"])                           # doctest: +SKIP
    """
    from paramctl.sources.base import OpenOptions
    from paramctl.surgery import ConvertPlan
    from paramctl.surgery import convert as run

    plan = ConvertPlan.parse(keep=keep, drop=drop, rename=rename, cast=cast,
                             cast_only=cast_only, no_cast=no_cast,
                             allow_overflow=allow_overflow)
    return run(os.fspath(source), plan, out=Path(out) if out is not None else None,
               options=OpenOptions(key=key), max_shard_size=max_shard_size, dry_run=dry_run)
