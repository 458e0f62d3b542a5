"""Figures every renderer shares: byte sizes, the JSON shape of a record, the module tree
rolled up from names, and the one-sentence summary of a change."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from paramctl.model import FLOAT_DTYPES, ChangeResult, ParamInfo, totals

T = TypeVar("T")

__all__ = [
    "TRAINABLE_WORDS",
    "ShapeTexts",
    "TreeRow",
    "action_text",
    "chunks",
    "grad_bits",
    "human_bytes",
    "param_record",
    "pct",
    "summary_line",
    "totals_record",
    "trainable_summary",
    "tree_rows",
]


_CHUNK = 4096  # rows rendered per write: one string per chunk, not per row or per table


def chunks(items: Sequence[T]) -> Iterator[Sequence[T]]:
    """``items`` in slices of a few thousand, so that a listing of 100,000 rows is written
    in a few dozen writes without ever holding all of it as one string."""
    for start in range(0, len(items), _CHUNK):
        yield items[start:start + _CHUNK]


class ShapeTexts(dict[tuple[int, ...], str]):
    """``2048x2048`` (``scalar`` for ``()``), each distinct shape formatted once: a listing
    repeats a handful of shapes over thousands of rows."""

    def __missing__(self, shape: tuple[int, ...]) -> str:
        text = "x".join(map(str, shape)) if shape else "scalar"
        self[shape] = text
        return text


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
    if not any(p.tied for p in params):
        return _untied_tree_rows(params, depth)
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


_STATES = {0: "-", 1: "yes", 2: "no", 3: "partial"}  # bit 1: some train, bit 2: some not


def _untied_tree_rows(params: Sequence[ParamInfo], depth: int | None) -> list[TreeRow]:
    """:func:`tree_rows` when no tensor is tied (nothing to count once): plain sums.

    Each parameter is added to its own module, and each module, children before parents,
    to its parent: one addition per parameter and per module, where summing every module
    over the parameters beneath it costs one per parameter and ancestor (a 100,000-tensor
    model has 130,000 modules, six deep).
    """
    floats = FLOAT_DTYPES
    sums: dict[str, list[int]] = {"": [0, 0, 0]}  # module -> [numel, bytes, state bits]
    up: dict[str, str] = {}  # module -> its parent
    children: dict[str, list[str]] = {"": []}
    order: list[str] = []  # parents before children
    for p in params:
        key = p.name.rpartition(".")[0]
        if depth is not None and key.count(".") >= depth:
            key = ".".join(key.split(".")[:depth])
        acc = sums.get(key)
        if acc is None:
            new = []  # this module and its ancestors not seen yet, bottom up
            probe = key
            while probe not in sums:
                new.append(probe)
                sums[probe] = [0, 0, 0]
                probe = probe.rpartition(".")[0]
            for module in reversed(new):
                parent = module.rpartition(".")[0]
                up[module] = parent
                children[module] = []
                children[parent].append(module)
                order.append(module)
            acc = sums[key]
        acc[0] += p.numel
        acc[1] += p.nbytes
        if p.dtype in floats and not p.buffer:
            acc[2] |= 1 if p.requires_grad else 2
    for module in reversed(order):
        acc, total = sums[module], sums[up[module]]
        total[0] += acc[0]
        total[1] += acc[1]
        total[2] |= acc[2]
    rows: list[TreeRow] = []
    stack = [""]
    while stack:
        key = stack.pop()
        numel, nbytes, state = sums[key]
        rows.append(TreeRow(key or "(all)", 0 if not key else key.count(".") + 1, numel,
                            nbytes, _STATES[state]))
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
