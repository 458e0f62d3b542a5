"""Every output paramctl prints: tables, trees, TSV, JSON, JSONL and names.

The only module that imports rich, and only for ``table`` output; TSV and JSON are
written directly so pipelines never pay for it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from paramctl.core import ChangeResult
from paramctl.model import FLOAT_DTYPES, Inventory, ParamInfo, totals

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["FORMATS", "render_changes", "render_inventory", "render_tree", "tree_rows"]

FORMATS = ("table", "tsv", "json", "jsonl", "names")


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError


def _pct(part: int, whole: int) -> str:
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


def _console(out: TextIO, width: int | None) -> Console:
    from rich.console import Console

    return Console(file=out, width=width, highlight=False, soft_wrap=False)


def _totals_record(params: Sequence[ParamInfo]) -> dict[str, Any]:
    t = totals(params)
    return {"numel": t.numel, "trainable": t.trainable, "frozen": t.frozen, "bytes": t.nbytes,
            "by_dtype": dict(sorted(t.by_dtype.items()))}


def render_inventory(inv: Inventory, fmt: str, out: TextIO, *, headers: bool = True,
                     width: int | None = None) -> None:
    params = inv.params
    if fmt == "json":
        doc = {"source": inv.source, "format": inv.format,
               "parameters": [param_record(p) for p in params],
               "totals": _totals_record(params)}
        out.write(json.dumps(doc, indent=2) + "\n")
    elif fmt == "jsonl":
        for p in params:
            out.write(json.dumps(param_record(p)) + "\n")
    elif fmt == "names":
        for p in params:
            out.write(p.name + "\n")
    elif fmt == "tsv":
        if headers:
            out.write("name\tshape\tdtype\tnumel\trequires_grad\n")
        for p in params:
            out.write(f"{p.name}\t{p.shape_text}\t{p.dtype}\t{p.numel}\t"
                      f"{'true' if p.requires_grad else 'false'}\n")
    else:
        _inventory_table(inv, out, headers=headers, width=width)


def _trainable_cell(p: ParamInfo) -> str:
    if p.buffer:
        return "[dim]buffer[/]"
    if p.dtype not in FLOAT_DTYPES:
        return "[dim]-[/]"
    return "[green]yes[/]" if p.requires_grad else "[red]no[/]"


def _inventory_table(inv: Inventory, out: TextIO, *, headers: bool, width: int | None) -> None:
    from rich.table import Table

    params = inv.params
    any_tied = any(p.tied for p in params)
    table = Table(show_header=headers, box=None, pad_edge=False, header_style="bold")
    table.add_column("name", overflow="fold")
    table.add_column("shape")
    table.add_column("dtype")
    table.add_column("params", justify="right")
    table.add_column("trainable")
    if any_tied:
        table.add_column("tied with", overflow="fold")
    for p in params:
        row = [p.name, p.shape_text, p.dtype, f"{p.numel:,}", _trainable_cell(p)]
        if any_tied:
            row.append(", ".join(p.tied))
        table.add_row(*row)
    console = _console(out, width)
    console.print(table)
    if headers:
        for line in footer_lines(params):
            console.print(line)


def footer_lines(params: Sequence[ParamInfo]) -> list[str]:
    t = totals(params)
    tied = sum(1 for p in params if p.tied)
    lines = [
        f"[bold]{t.tensors} tensors[/], {t.numel:,} params, {human_bytes(t.nbytes)}"
        + (f" ({tied} tied names; shared tensors counted once)" if tied else ""),
        f"trainable {t.trainable:,} ({_pct(t.trainable, t.numel)}) · "
        f"frozen {t.frozen:,} ({_pct(t.frozen, t.numel)})",
    ]
    if t.by_dtype:
        lines.append("by dtype: " + ", ".join(
            f"{d} {human_bytes(b)}" for d, b in sorted(t.by_dtype.items())))
    from paramctl.memory import estimate

    lines.append(f"training AdamW fp32: {human_bytes(estimate(params).bytes.total)} "
                 "(with this frozen set)")
    return lines


# -- tree ----------------------------------------------------------------------------------
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
        flags = {p.requires_grad for p in group if p.dtype in FLOAT_DTYPES and not p.buffer}
        state = "-" if not flags else "partial" if len(flags) == 2 else (
            "yes" if flags.pop() else "no")
        rows.append(TreeRow(key or "(all)", 0 if not key else key.count(".") + 1, t.numel,
                            t.nbytes, state))
        stack.extend(reversed(children[key]))
    return rows


def render_tree(inv: Inventory, fmt: str, out: TextIO, *, depth: int | None = None,
                headers: bool = True, width: int | None = None) -> None:
    rows = tree_rows(inv.params, depth)
    if fmt in ("json", "jsonl"):
        records = [{"module": r.module, "depth": r.depth, "numel": r.numel, "bytes": r.nbytes,
                    "trainable": r.trainable} for r in rows]
        if fmt == "jsonl":
            for rec in records:
                out.write(json.dumps(rec) + "\n")
        else:
            out.write(json.dumps({"source": inv.source, "format": inv.format,
                                  "modules": records}, indent=2) + "\n")
        return
    if fmt == "names":
        for r in rows[1:]:
            out.write(r.module + "\n")
        return
    if fmt == "tsv":
        if headers:
            out.write("module\tnumel\tbytes\ttrainable\n")
        for r in rows:
            out.write(f"{r.module}\t{r.numel}\t{r.nbytes}\t{r.trainable}\n")
        return
    from rich.table import Table

    colour = {"yes": "[green]yes[/]", "no": "[red]no[/]", "partial": "[yellow]partial[/]",
              "-": "[dim]-[/]"}
    table = Table(show_header=headers, box=None, pad_edge=False, header_style="bold")
    table.add_column("module", overflow="fold")
    table.add_column("params", justify="right")
    table.add_column("size", justify="right")
    table.add_column("trainable")
    for r in rows:
        label = r.module if r.depth == 0 else "  " * (r.depth - 1) + r.module.rsplit(".", 1)[-1]
        table.add_row(label, f"{r.numel:,}", human_bytes(r.nbytes), colour[r.trainable])
    _console(out, width).print(table)


# -- changes ---------------------------------------------------------------------------------
def _action_text(action: str) -> str:
    if action in ("freeze", "unfreeze"):
        return action
    return f"init {action}"


def render_changes(result: ChangeResult, fmt: str, out: TextIO, *, dry_run: bool,
                   headers: bool = True, width: int | None = None) -> None:
    changes = result.changes
    if fmt in ("json", "jsonl"):
        records = [{"name": c.name, "shape": list(c.shape), "dtype": c.dtype,
                    "action": c.action, "requires_grad_before": c.before,
                    "requires_grad_after": c.after, "via": c.via} for c in changes]
        if fmt == "jsonl":
            for rec in records:
                out.write(json.dumps(rec) + "\n")
            return
        doc = {"source": result.source, "format": result.format, "dry_run": dry_run,
               "written": str(result.written) if result.written else None,
               "changes": records, "unchanged": result.unchanged, "skipped": result.skipped}
        out.write(json.dumps(doc, indent=2) + "\n")
        return
    if fmt == "names":
        for c in changes:
            out.write(c.name + "\n")
        return
    if fmt == "tsv":
        if headers:
            out.write("name\taction\trequires_grad_before\trequires_grad_after\tvia\n")
        for c in changes:
            out.write(f"{c.name}\t{c.action}\t{str(c.before).lower()}\t"
                      f"{str(c.after).lower()}\t{c.via or ''}\n")
        return
    from rich.table import Table

    console = _console(out, width)
    if changes:
        table = Table(show_header=headers, box=None, pad_edge=False, header_style="bold")
        table.add_column("name", overflow="fold")
        table.add_column("shape")
        table.add_column("dtype")
        table.add_column("change")
        table.add_column("note", overflow="fold")
        for c in changes:
            note = f"tied with {c.via}" if c.via else ""
            table.add_row(c.name, "x".join(map(str, c.shape)) or "scalar", c.dtype,
                          _action_text(c.action), note)
        console.print(table)
    out.write(summary_line(result, dry_run=dry_run) + "\n")


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
        parts.append(f"{len(result.skipped)} skipped (not floating-point, never trainable)")
    text = "; ".join(parts)
    if dry_run:
        return text + "; nothing written (dry run)"
    if result.written is not None:
        return text + f"; wrote {result.written}"
    return text + "; nothing to write"
