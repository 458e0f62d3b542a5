"""Figures every renderer shares: byte sizes, the JSON shape of a record, the module tree
rolled up from names, and the one-sentence summary of a change."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from paramctl.model import FLOAT_DTYPES, ChangeResult, ParamInfo, totals

__all__ = [
    "TRAINABLE_WORDS", "TreeRow", "action_text", "grad_bits", "human_bytes", "param_record",
    "pct", "summary_line", "totals_record", "trainable_summary", "tree_rows",
]


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError


def pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "0.0%"


def param_record(p: ParamInfo) -> dict[str, Any]:
    """The stable JSON shape of one parameter."""
    return {
        "name": p.name,
        "shape": list(p.shape),
        "dtype": p.dtype,
        "numel": p.numel,
        "bytes": p.nbytes,
        "requires_grad": p.requires_grad,
        "tied": list(p.tied) if p.tied else None,
        "buffer": p.buffer,
    }


def totals_record(params: Sequence[ParamInfo]) -> dict[str, Any]:
    t = totals(params)
    return {"numel": t.numel, "trainable": t.trainable, "frozen": t.frozen, "bytes": t.nbytes,
            "by_dtype": dict(sorted(t.by_dtype.items()))}


def grad_bits(p: ParamInfo) -> int:
    """1 for a trainable parameter, 2 for a frozen one, 0 for neither (a buffer, or not
    floating point). OR-ed over a module's tensors it gives the module's state: 0 none,
    1 trainable, 2 frozen, 3 partial (``TRAINABLE_WORDS`` names them for ``--tree``)."""
    if p.buffer or p.dtype not in FLOAT_DTYPES:
        return 0
    return 1 if p.requires_grad else 2


TRAINABLE_WORDS = ("-", "yes", "no", "partial")


@dataclass
class TreeRow:
    module: str
    depth: int
    numel: int
    nbytes: int
    trainable: str  # yes / no / partial / -


def tree_rows(params: Sequence[ParamInfo], depth: int | None = None) -> list[TreeRow]:
    """Roll parameters up by module (dotted prefixes), tied tensors counted once per row.

    Rows come parent first, then its children in the order they first appear, whatever
    order the source lists tensors in (safetensors headers sort by dtype and name).
    """
    members: dict[str, list[ParamInfo]] = {"": list(params)}
    children: dict[str, list[str]] = {"": []}
    for p in params:
        parts = p.name.split(".")[:-1]
        parent = ""
        for i in range(1, len(parts) + 1):
            if depth is not None and i > depth:
                break
            key = ".".join(parts[:i])
            if key not in members:
                members[key] = []
                children[key] = []
                children[parent].append(key)
            members[key].append(p)
            parent = key
    rows: list[TreeRow] = []
    stack = [""]
    while stack:
        key = stack.pop()
        group = members[key]
        t = totals(group)
        bits = 0
        for p in group:
            bits |= grad_bits(p)
        state = TRAINABLE_WORDS[bits]
        rows.append(TreeRow(key or "(all)", 0 if not key else key.count(".") + 1, t.numel,
                            t.nbytes, state))
        stack.extend(reversed(children[key]))
    return rows


def action_text(action: str) -> str:
    if action in ("freeze", "unfreeze"):
        return action
    return f"init {action}"


def summary_line(result: ChangeResult, *, dry_run: bool) -> str:
    """One sentence saying what happened (or would happen)."""
    n = len(result.changes)
    numel = sum(math.prod(c.shape) for c in result.changes)
    verb = "would change" if dry_run else "changed"
    parts = [f"{verb} {n} tensor{'s' if n != 1 else ''} ({numel:,} params)"]
    tied = [c for c in result.changes if c.via]
    if tied:
        parts.append(f"{len(tied)} through tied names")
    if result.unchanged:
        parts.append(f"{len(result.unchanged)} already in that state")
    if result.skipped:
        parts.append(f"{len(result.skipped)} skipped (buffers or not floating-point: never "
                     "trainable)")
    parts.extend(result.notes)
    text = "; ".join(parts)
    if dry_run:
        return text + "; nothing written (dry run)"
    if result.written is not None:
        return text  # `wrote PATH` follows on stderr
    return text + "; nothing to write"


def trainable_summary(params: Sequence[ParamInfo]) -> str:
    """PEFT's ``print_trainable_parameters()`` line, over paramctl's totals (tied tensors
    once; buffers and integer tensors count in "all params", never as trainable).

    >>> trainable_summary([ParamInfo("w", (4,), "float32", 4, 16, True),
    ...                    ParamInfo("b", (2,), "float32", 2, 8, False)])
    'trainable params: 4 || all params: 6 || trainable%: 66.6667'
    """
    t = totals(params)
    share = 100 * t.trainable / t.numel if t.numel else 0.0
    return (f"trainable params: {t.trainable:,d} || all params: {t.numel:,d} || "
            f"trainable%: {share:.4f}")
