"""Output for programs: TSV (no header unless asked, no colour, no truncation), JSON, JSONL
and names. Written directly, never through rich."""

from __future__ import annotations

import json
from typing import TextIO

from paramctl.model import ChangeResult, Inventory
from paramctl.render.common import ShapeTexts, chunks, param_record, totals_record, tree_rows

__all__ = ["MACHINE_FORMATS", "changes", "inventory", "tree"]

MACHINE_FORMATS = ("tsv", "json", "jsonl", "names")


def inventory(inv: Inventory, fmt: str, out: TextIO, *, headers: bool = False) -> None:
    params = inv.params
    if fmt == "json":
        doc = {"source": inv.source, "format": inv.format,
               "parameters": [param_record(p) for p in params],
               "totals": totals_record(params)}
        out.write(json.dumps(doc, indent=2) + "\n")
    elif fmt == "jsonl":
        for p in params:
            out.write(json.dumps(param_record(p)) + "\n")
    elif fmt == "names":
        for chunk in chunks(params):
            out.write("".join([p.name + "\n" for p in chunk]))
    else:
        if headers:
            out.write("name\tshape\tdtype\tnumel\trequires_grad\n")
        shapes = ShapeTexts()
        for chunk in chunks(params):
            out.write("".join([f"{p.name}\t{shapes[p.shape]}\t{p.dtype}\t{p.numel}\t"
                               f"{'true' if p.requires_grad else 'false'}\n" for p in chunk]))


def tree(inv: Inventory, fmt: str, out: TextIO, *, depth: int | None = None,
         headers: bool = False) -> None:
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
    if headers:
        out.write("module\tnumel\tbytes\ttrainable\n")
    for r in rows:
        out.write(f"{r.module}\t{r.numel}\t{r.nbytes}\t{r.trainable}\n")


def changes(result: ChangeResult, fmt: str, out: TextIO, *, dry_run: bool,
            headers: bool = False) -> None:
    items = result.changes
    if fmt in ("json", "jsonl"):
        records = [{"name": c.name, "shape": list(c.shape), "dtype": c.dtype,
                    "action": c.action, "requires_grad_before": c.before,
                    "requires_grad_after": c.after, "via": c.via} for c in items]
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
        for c in items:
            out.write(c.name + "\n")
        return
    if headers:
        out.write("name\taction\trequires_grad_before\trequires_grad_after\tvia\n")
    for c in items:
        out.write(f"{c.name}\t{c.action}\t{str(c.before).lower()}\t"
                  f"{str(c.after).lower()}\t{c.via or ''}\n")
