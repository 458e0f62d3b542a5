"""Output for programs: TSV (no header unless asked, no colour, no truncation), JSON, JSONL
and names. Written directly, never through rich.

In TSV and ``names`` every name is escaped so that one record stays one line and one field:
a tab becomes ``\\t``, a newline ``\\n``, a carriage return ``\\r`` and a backslash
``\\\\`` (``--names-from`` reverses it). JSON carries names as they are.
"""

from __future__ import annotations

import json
from typing import Any, TextIO

from paramctl.model import ChangeResult, Inventory
from paramctl.render.common import ShapeTexts, chunks, param_record, totals_record, tree_rows

__all__ = ["CHANGES_TSV_COLUMNS", "INVENTORY_TSV_COLUMNS", "MACHINE_FORMATS", "changes",
           "escape_field", "inventory", "tree", "unescape_field"]

MACHINE_FORMATS = ("tsv", "json", "jsonl", "names")

INVENTORY_TSV_COLUMNS = ("name", "shape", "dtype", "numel", "requires_grad", "tied")
# ``via`` sits before the flags so that a line never ends in an empty field.
CHANGES_TSV_COLUMNS = ("name", "action", "via", "requires_grad_before", "requires_grad_after")

_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}


def escape_field(text: str) -> str:
    """``a\\tb`` for a name holding a tab: one TSV field, one line.

    >>> escape_field("odd\\tname\\\\x")
    'odd\\\\tname\\\\\\\\x'
    """
    if not any(c in text for c in _ESCAPES):
        return text
    return "".join(_ESCAPES.get(c, c) for c in text)


def unescape_field(text: str) -> str:
    """Undo :func:`escape_field`; a backslash before any other character stays as it is.

    >>> unescape_field(escape_field("a\\tb\\\\n")) == "a\\tb\\\\n"
    True
    """
    if "\\" not in text:
        return text
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in _UNESCAPES:
            out.append(_UNESCAPES[text[i + 1]])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def inventory(inv: Inventory, fmt: str, out: TextIO, *, headers: bool = False) -> None:
    params = inv.params
    if fmt == "json":
        doc: dict[str, Any] = {"source": inv.source, "format": inv.format}
        if inv.metadata is not None:
            doc["metadata"] = inv.metadata
        doc["parameters"] = [param_record(p) for p in params]
        doc["totals"] = totals_record(params)
        if inv.extra:
            doc.update(inv.extra)  # e.g. "adapter": only when the source has one
        out.write(json.dumps(doc, indent=2) + "\n")
    elif fmt == "jsonl":
        for p in params:
            out.write(json.dumps(param_record(p)) + "\n")
    elif fmt == "names":
        for chunk in chunks(params):
            out.write("".join([escape_field(p.name) + "\n" for p in chunk]))
    else:
        if headers:
            out.write("\t".join(INVENTORY_TSV_COLUMNS) + "\n")
        shapes = ShapeTexts()
        for chunk in chunks(params):
            out.write("".join([
                f"{escape_field(p.name)}\t{shapes[p.shape]}\t{p.dtype}\t{p.numel}\t"
                f"{'true' if p.requires_grad else 'false'}\t"
                f"{','.join(escape_field(t) for t in p.tied)}\n" for p in chunk]))


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
            out.write(escape_field(r.module) + "\n")
        return
    if headers:
        out.write("module\tnumel\tbytes\ttrainable\n")
    for r in rows:
        out.write(f"{escape_field(r.module)}\t{r.numel}\t{r.nbytes}\t{r.trainable}\n")


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
            out.write(escape_field(c.name) + "\n")
        return
    if headers:
        out.write("\t".join(CHANGES_TSV_COLUMNS) + "\n")
    for c in items:
        out.write(f"{escape_field(c.name)}\t{escape_field(c.action)}\t"
                  f"{escape_field(c.via or '')}\t{str(c.before).lower()}\t"
                  f"{str(c.after).lower()}\n")
