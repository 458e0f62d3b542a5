"""Output of ``stats`` and ``diff``: an aligned table for people, TSV (the documented
columns, no header unless asked), JSON and JSONL. Plain text: no rich, so a table of
100,000 rows is written as fast as TSV."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any, TextIO

__all__ = ["DIFF_FORMATS", "STATS_FORMATS", "render_diff", "render_stats"]

STATS_FORMATS = ("table", "tsv", "json", "jsonl")
DIFF_FORMATS = ("table", "tsv", "json", "jsonl", "html")
_STATS_FIELDS = ("min", "max", "mean", "std", "l2")


def _num(value: float | None) -> str:
    """A figure for a table cell: 6 significant digits, ``-`` when absent."""
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    return f"{value:.6g}"


def _tsv_num(value: float | int | None) -> str:
    """A figure for TSV: exact (repr round-trips a float), empty when absent."""
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def _shape(shape: Sequence[int] | None) -> str:
    if shape is None:
        return "-"
    return "x".join(map(str, shape)) if shape else "scalar"


def _table(out: TextIO, header: Sequence[str], rows: Sequence[Sequence[str]],
           right: set[int]) -> None:
    widths = [len(h) for h in header]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    out.write(line(header) + "\n")
    for row in rows:
        out.write(line(row) + "\n")


def render_stats(result: Any, fmt: str, out: TextIO, *, headers: bool = True) -> None:
    """``result``: a :class:`paramctl.values.StatsResult`."""
    rows = result.rows
    if fmt == "json":
        doc = {"source": result.source, "format": result.format,
               "tensors": [r.to_json() for r in rows], "totals": result.totals}
        out.write(json.dumps(doc, indent=2) + "\n")
        return
    if fmt == "jsonl":
        for r in rows:
            out.write(json.dumps(r.to_json()) + "\n")
        return
    if fmt == "tsv":
        if headers:
            out.write("name\tshape\tdtype\tnumel\tmin\tmax\tmean\tstd\tl2\tzeros\tnan\tinf\n")
        for r in rows:
            cells = [r.name, _shape(r.shape), r.dtype, str(r.numel),
                     *(_tsv_num(getattr(r, f)) for f in _STATS_FIELDS),
                     _tsv_num(r.zeros), _tsv_num(r.nan), _tsv_num(r.inf)]
            out.write("\t".join(cells) + "\n")
        return
    header = ["name", "shape", "dtype", "numel", "min", "max", "mean", "std", "l2", "zeros",
              "nan", "inf"]
    cells = []
    for r in rows:
        if r.note:
            cells.append([r.name, _shape(r.shape), r.dtype, f"{r.numel:,}", r.note,
                          "", "", "", "", "", "", ""])
            continue
        cells.append([r.name, _shape(r.shape), r.dtype, f"{r.numel:,}",
                      *(_num(getattr(r, f)) for f in _STATS_FIELDS),
                      f"{r.zeros:,}", f"{r.nan:,}", f"{r.inf:,}"])
    _table(out, header, cells, right=set(range(3, 12)))
    if headers:
        t = result.totals
        out.write(f"{t['tensors']:,} tensors, {t['numel']:,} values; nan {t['nan']:,}, "
                  f"inf {t['inf']:,} in {t['nonfinite_tensors']:,} tensors\n")


def render_diff(result: Any, fmt: str, out: TextIO, *, show_all: bool = False,
                headers: bool = True) -> None:
    """``result``: a :class:`paramctl.values.DiffResult`."""
    rows = result.rows
    if fmt == "json":
        doc = {"a": result.a, "b": result.b, "tensors": [r.to_json() for r in rows],
               "totals": result.totals}
        out.write(json.dumps(doc, indent=2) + "\n")
        return
    if fmt == "jsonl":
        for r in rows:
            out.write(json.dumps(r.to_json()) + "\n")
        return
    if fmt == "html":
        from paramctl.render.picture import diff_html

        out.write(diff_html([r.to_json() for r in rows], result.a, result.b))
        return
    shown = [r for r in rows if show_all or r.differs]

    def flag(value: bool | None) -> str:
        return "" if value is None else "true" if value else "false"

    if fmt == "tsv":
        if headers:
            out.write("name\tstatus\tmax_abs\trel_l2\tcosine\trequires_grad_a\t"
                      "requires_grad_b\n")
        for r in shown:
            out.write(f"{r.name}\t{r.status}\t{_tsv_num(r.max_abs)}\t{_tsv_num(r.rel_l2)}\t"
                      f"{_tsv_num(r.cosine)}\t{flag(r.requires_grad_a)}\t"
                      f"{flag(r.requires_grad_b)}\n")
        return
    header = ["name", "status", "shape", "dtype", "max_abs", "rel_l2", "cosine", "trainable"]
    cells = []
    for r in shown:
        shape = _shape(r.shape_a if r.shape_a is not None else r.shape_b)
        if r.status == "shape":
            shape = f"{_shape(r.shape_a)} -> {_shape(r.shape_b)}"
        dtype = r.dtype_a or r.dtype_b or "-"
        if r.dtype_a and r.dtype_b and r.dtype_a != r.dtype_b:
            dtype = f"{r.dtype_a} -> {r.dtype_b}"
        trainable = flag(r.requires_grad_a if r.requires_grad_a is not None
                         else r.requires_grad_b) or "-"
        if r.flag_changed:
            trainable = f"{flag(r.requires_grad_a)} -> {flag(r.requires_grad_b)}"
        cells.append([r.name, r.status, shape, dtype, _num(r.max_abs), _num(r.rel_l2),
                      _num(r.cosine), trainable])
    if cells:
        _table(out, header, cells, right={4, 5, 6})
    if headers:
        t = result.totals
        parts = [f"{v:,} {k}" for k, v in t.items() if v and k != "flags"]
        if t["flags"]:
            parts.append(f"{t['flags']:,} requires_grad changes")
        hidden = len(rows) - len(shown)
        note = f" ({hidden:,} unchanged not shown; --all shows them)" if hidden else ""
        out.write(f"{len(rows):,} names: {', '.join(parts) or 'nothing'}{note}\n")
