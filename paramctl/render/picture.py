"""Pictures of a checkpoint: a self-contained HTML page (``list -f html``, ``diff -f html``)
and a standalone SVG (``list -f svg``), both treemaps of the module hierarchy.

The page is one file with no network request of any kind: its CSS and script
(``picture.css``, ``picture.js`` beside this module) are inlined, and the data is embedded
once as JSON that the script reads; names (untrusted: they come from files) only ever
reach the page through ``textContent``, never as HTML. The script lays the treemap out
itself, with the algorithm of :mod:`paramctl.render.treemap`, so that zooming into a
module redraws it at full size with its own small parts visible.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

from paramctl.model import DTYPE_SIZES, Inventory, ParamInfo, counted_once, totals
from paramctl.render.common import grad_bits, human_bytes, pct
from paramctl.render.treemap import (
    BUDGET,
    HEADER,
    MIN_AREA,
    PAD,
    Node,
    Rect,
    Tile,
    build_tree,
    layout,
    module_tree,
)

__all__ = ["DIFF_STATUSES", "SVG_SIZE", "diff_html", "list_html", "list_svg"]

SVG_SIZE = (1200, 720)  # the treemap's size in list_svg, px

DIFF_STATUSES = ("same", "present", "changed", "dtype", "shape", "added", "removed")

# The page's colours; picture.js holds the same for what it draws.
STATE_FILL = {"trainable": "#8fd19e", "frozen": "#9ecae1", "partial": "#fdc086",
              "none": "#d9d9d9"}
STATE_FRAME = {"trainable": "#eef8f0", "frozen": "#edf5fb", "partial": "#fff3e6",
               "none": "#f3f3f3"}


# -- the HTML page -----------------------------------------------------------------------------
def _asset(name: str) -> str:
    return resources.files("paramctl.render").joinpath(name).read_text(encoding="utf-8")


def _json_for_script(doc: object) -> str:
    """JSON safe inside ``<script type="application/json">``: ASCII only (no lone
    surrogate can break the encoding) and no ``<``, so neither ``</script>`` nor ``<!--``
    can end or change the element whatever the names hold."""
    text = json.dumps(doc, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _page(doc: Mapping[str, Any]) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        # No request can leave the page: no fetch, image, font or favicon from anywhere.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        "<link rel=\"icon\" href=\"data:,\">\n"
        "<title>paramctl</title>\n"
        f"<style>\n{_asset('picture.css')}</style>\n</head>\n<body>\n"
        "<header><h1 id=\"title\"></h1><div id=\"source\"></div></header>\n"
        "<section id=\"legend\"></section>\n"
        "<nav id=\"crumbs\" aria-label=\"zoom\"></nav>\n"
        "<div id=\"map\" role=\"img\"></div>\n"
        "<p id=\"note\"></p>\n"
        "<div id=\"tip\" hidden></div>\n"
        "<section id=\"tablebox\">\n<div id=\"tools\"><input id=\"filter\" type=\"search\" "
        "placeholder=\"filter: substring, glob (layers.*.attn) or re:REGEX\" "
        "autocomplete=\"off\" spellcheck=\"false\"><span id=\"count\"></span></div>\n"
        "<table id=\"tensors\"><thead><tr></tr></thead><tbody></tbody></table>\n"
        "</section>\n"
        f"<script type=\"application/json\" id=\"data\">{_json_for_script(doc)}</script>\n"
        f"<script>\n{_asset('picture.js')}</script>\n</body>\n</html>\n"
    )


class _Coder:
    """The module tree as compact arrays: every label once in a table, each module as
    (parent, label), each tensor as (module, label, ...); the page joins labels back
    into names. Module 0 is the root."""

    def __init__(self, root: Node, modules: list[Node]) -> None:
        self.labels: list[str] = []
        self._label_ids: dict[str, int] = {}
        self._module_ids: dict[int, int] = {id(root): 0}
        self.mods: list[int] = []
        for i, m in enumerate(modules, start=1):
            self._module_ids[id(m)] = i
            assert m.parent is not None
            self.mods += [self._module_ids[id(m.parent)], self.label(m.label)]

    def label(self, text: str) -> int:
        found = self._label_ids.get(text)
        if found is None:
            found = self._label_ids[text] = len(self.labels)
            self.labels.append(text)
        return found

    def leaf(self, leaf: Node) -> list[int]:
        assert leaf.parent is not None
        return [self._module_ids[id(leaf.parent)], self.label(leaf.label)]


class _Kinds:
    """Shape, dtype, numel and bytes, each distinct combination stored once (a model has
    few): a tensor refers to its kind by index, -1 for none."""

    def __init__(self) -> None:
        self.table: list[list[Any]] = []
        self._ids: dict[tuple[str, str, int, int], int] = {}

    def __call__(self, shape: Sequence[int] | None, dtype: str | None, numel: int,
                 nbytes: int) -> int:
        if shape is None or dtype is None:
            return -1
        text = "x".join(str(d) for d in shape) if shape else "scalar"
        key = (text, dtype, numel, nbytes)
        found = self._ids.get(key)
        if found is None:
            found = self._ids[key] = len(self.table)
            self.table.append([text, dtype, numel, nbytes])
        return found


def _layout_constants() -> dict[str, float]:
    return {"minArea": MIN_AREA, "budget": BUDGET, "header": HEADER, "pad": PAD}


def _legend_lines(params: Sequence[ParamInfo]) -> list[str]:
    t = totals(params)
    tied = sum(1 for p in params if p.tied)
    lines = [f"{t.tensors:,} tensors, {t.numel:,} params, {human_bytes(t.nbytes)}"
             + (f" ({tied} tied names; shared tensors counted once)" if tied else ""),
             f"trainable {t.trainable:,} ({pct(t.trainable, t.numel)}) · "
             f"frozen {t.frozen:,} ({pct(t.frozen, t.numel)})"]
    if t.by_dtype:
        lines.append("by dtype: " + ", ".join(
            f"{d} {human_bytes(b)}" for d, b in sorted(t.by_dtype.items())))
    return lines


def list_html(inv: Inventory) -> str:
    """The page for ``paramctl list -f html``: a treemap of the module hierarchy (area ∝
    bytes, tied tensors counted once, coloured trainable / frozen / partial), a legend with
    the totals, and a filterable, sortable table of the tensors.

    >>> page = list_html(Inventory("m.pt", "pt", [ParamInfo("fc.weight", (2, 2), "float32",
    ...                                                     4, 16, True)]))
    >>> page.startswith("<!DOCTYPE html>") and "fc.weight" in page
    True
    """
    params = inv.params
    root, modules, leaves = module_tree(params)
    coder = _Coder(root, modules)
    kind = _Kinds()
    rows: list[int] = []
    tied: list[list[Any]] = []
    for i, (p, leaf, counts) in enumerate(zip(params, leaves, counted_once(params),
                                              strict=True)):
        flags = grad_bits(p) | (4 if counts else 0) | (8 if p.buffer else 0)
        rows += [*coder.leaf(leaf), kind(p.shape, p.dtype, p.numel, p.nbytes), flags]
        if p.tied:
            tied.append([i, ", ".join(p.tied)])
    doc = {
        "kind": "list", "title": "paramctl list", "source": inv.source, "format": inv.format,
        "legend": _legend_lines(params), "layout": _layout_constants(),
        "labels": coder.labels, "mods": coder.mods, "width": 4, "t": rows, "kinds": kind.table,
        "tied": tied,
    }
    return _page(doc)


def _row_bytes(row: Mapping[str, Any], side: str) -> int:
    given = row.get(f"bytes_{side}")
    if isinstance(given, int):
        return given
    shape, dtype = row.get(f"shape_{side}"), row.get(f"dtype_{side}")
    if shape is None or dtype is None:
        return 0
    # A dtype without a fixed element size (quantised GGUF blocks) counts a byte apiece:
    # close enough for an area.
    return int(math.prod(shape)) * DTYPE_SIZES.get(str(dtype), 1)


def _grad_code(value: object) -> int:
    return 0 if value is None else 2 if value else 1


def _metric(value: object) -> float | str | None:
    """A number for the page; JSON has no NaN or infinity, so those go as the strings
    JavaScript's ``Number()`` reads back."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if math.isfinite(value):
        return float(value)
    return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"


def diff_html(rows: Sequence[Mapping[str, Any]], a: str, b: str) -> str:
    """The page for ``paramctl diff A B -f html``.

    ``rows`` are the ``"tensors"`` records of ``diff -f json`` (DESIGN, "diff"): dicts with
    ``name``, ``status`` (one of ``added removed shape dtype changed same present``),
    ``shape_a``/``shape_b`` (lists of ints, ``None`` on the side that lacks the tensor),
    ``dtype_a``/``dtype_b``, ``requires_grad_a``/``requires_grad_b`` (bool or ``None``),
    and ``max_abs``, ``rel_l2``, ``cosine`` (float or ``None``). Optional ``bytes_a`` /
    ``bytes_b`` give stored sizes; without them a size is numel x the dtype's element size.
    ``a`` and ``b`` name the two sources.

    Each tensor's area is proportional to the larger of its two sizes; colour says the
    status (same grey; added, removed, shape and dtype each their own colour; changed on a
    ramp of ``rel_l2``, log scale from 1e-8 to 1), and a dashed outline marks a changed
    ``requires_grad``.

    >>> page = diff_html([{"name": "fc.weight", "status": "changed", "shape_a": [2, 2],
    ...     "shape_b": [2, 2], "dtype_a": "float32", "dtype_b": "float32",
    ...     "requires_grad_a": True, "requires_grad_b": True, "max_abs": 0.5,
    ...     "rel_l2": 0.01, "cosine": 0.99}], "a.pt", "b.pt")
    >>> "fc.weight" in page
    True
    """
    names = [str(r["name"]) for r in rows]
    sizes = [(_row_bytes(r, "a"), _row_bytes(r, "b")) for r in rows]
    root, modules, leaves = build_tree(names, [float(max(s)) for s in sizes])
    coder = _Coder(root, modules)
    kind = _Kinds()
    out: list[int] = []
    metrics: list[list[Any]] = []
    counts = dict.fromkeys(DIFF_STATUSES, 0)
    flags_changed = 0
    for i, (r, leaf, (size_a, size_b)) in enumerate(zip(rows, leaves, sizes, strict=True)):
        status = str(r.get("status"))
        if status not in counts:
            status = "changed"
        counts[status] += 1
        shape_a, shape_b = r.get("shape_a"), r.get("shape_b")
        ka = kind(shape_a, r.get("dtype_a"), math.prod(shape_a or ()), size_a)
        kb = kind(shape_b, r.get("dtype_b"), math.prod(shape_b or ()), size_b)
        ga, gb = _grad_code(r.get("requires_grad_a")), _grad_code(r.get("requires_grad_b"))
        if ga and gb and ga != gb:
            flags_changed += 1
        out += [*coder.leaf(leaf), DIFF_STATUSES.index(status), ka, kb, ga | gb << 2]
        found = [_metric(r.get(k)) for k in ("max_abs", "rel_l2", "cosine")]
        if any(v is not None for v in found):
            metrics.append([i, *found])
    legend = [
        f"{len(rows):,} names: " + ", ".join(f"{counts[s]:,} {s}" for s in DIFF_STATUSES
                                             if counts[s]),
        f"requires_grad changed on {flags_changed:,}",
        f"A {human_bytes(sum(s[0] for s in sizes))} · B {human_bytes(sum(s[1] for s in sizes))}",
    ]
    doc = {
        "kind": "diff", "title": "paramctl diff", "source": f"{a}  →  {b}", "a": a, "b": b,
        "legend": legend, "layout": _layout_constants(), "labels": coder.labels,
        "mods": coder.mods, "width": 6, "t": out, "kinds": kind.table, "metrics": metrics,
        "statuses": list(DIFF_STATUSES),
    }
    return _page(doc)


# -- the SVG -----------------------------------------------------------------------------------
def _text(value: str) -> str:
    """A name as XML text: characters XML cannot hold (controls, lone surrogates) written
    as escapes, the rest escaped and non-ASCII as character references."""
    if not value.isprintable():
        value = "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace")
                        .decode("ascii") for c in value)
    return html.escape(value, quote=True).encode("ascii", "xmlcharrefreplace").decode("ascii")


def _fit(label: str, width: float, size: float = 11.0) -> str:
    """``label`` cut to what fits in ``width`` px (roughly 0.6 em a character)."""
    room = int((width - 6) / (0.6 * size))
    if room < 2:
        return ""
    return label if len(label) <= room else label[:room - 1] + "…"


def _tile_title(tile: Tile, params: Sequence[ParamInfo]) -> list[str]:
    node = tile.node
    if node.kind == "tensor" and node.item is not None:
        p = params[node.item]
        lines = [p.name, f"{p.shape_text} {p.dtype}", f"{human_bytes(p.nbytes)}, "
                 f"{p.numel:,} params", node.state]
        if p.tied:
            lines.append("tied with " + ", ".join(p.tied))
        return lines
    name = node.name or "(all)"
    head = f"{node.label} in {name}" if node.kind == "more" else name
    by_dtype: dict[str, int] = {}
    for i in node.items():
        by_dtype[params[i].dtype] = by_dtype.get(params[i].dtype, 0) + params[i].nbytes
    mix = ", ".join(f"{d} {human_bytes(n)}" for d, n in sorted(by_dtype.items()))
    return [head, f"{human_bytes(int(node.weight))}, {node.numel:,} params, "
            f"{node.tensors:,} tensors", mix, node.state]


def list_svg(inv: Inventory) -> str:
    """The treemap of ``list -f html`` alone, as a standalone SVG document
    (``paramctl list -f svg``), ``SVG_SIZE`` px plus a line of totals.

    Each rectangle shown as a leaf — a tensor, a module drawn whole, or a "(N smaller)"
    block — is one ``<rect>`` with a ``<title>`` (hover text in viewers); a module drawn
    with its parts inside is a ``<path>`` frame with its label in a strip at the top.
    """
    params = inv.params
    width, height = SVG_SIZE
    root, _, _ = module_tree(params)
    tm = layout(root, Rect(0.0, 0.0, float(width), float(height)))
    foot = _legend_lines(params)[:2]
    if tm.aggregated_tensors:
        foot.append(_aggregation_note(tm.aggregated_tensors, tm.aggregated_blocks))
    total_h = height + 8 + 16 * len(foot)
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>\n',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total_h}" '
        f'viewBox="0 0 {width} {total_h}" font-family="system-ui, sans-serif" '
        f'font-size="11">\n',
        f"<title>{_text('paramctl list ' + inv.source)}</title>\n",
        "<style>rect{stroke:#fff;stroke-width:1}path{stroke-width:1}"
        "text{fill:#111;pointer-events:none}.more{stroke-dasharray:3 2;stroke:#555}</style>\n",
    ]
    for tile in tm.tiles:
        r, node = tile.rect, tile.node
        title = f"<title>{chr(10).join(map(_text, _tile_title(tile, params)))}</title>"
        if tile.leaf:
            cls = ' class="more"' if node.kind == "more" else ""
            out.append(f'<rect x="{r.x:.2f}" y="{r.y:.2f}" width="{r.w:.2f}" '
                       f'height="{r.h:.2f}" fill="{STATE_FILL[node.state]}"{cls}>'
                       f"{title}</rect>\n")
            label = _fit(node.label, r.w) if r.h >= 14 else ""
            if label:
                out.append(f'<text x="{r.x + 3:.2f}" y="{r.y + 12:.2f}">{_text(label)}</text>\n')
        else:
            out.append(f'<path d="M{r.x:.2f} {r.y:.2f}h{r.w:.2f}v{r.h:.2f}h{-r.w:.2f}z" '
                       f'fill="{STATE_FRAME[node.state]}" stroke="{STATE_FILL[node.state]}">'
                       f"{title}</path>\n")
            label = _fit(f"{node.label}  {human_bytes(int(node.weight))}", r.w)
            if tile.header and label:
                out.append(f'<text x="{r.x + 3:.2f}" y="{r.y + 12:.2f}" font-weight="600">'
                           f"{_text(label)}</text>\n")
    for i, line in enumerate(foot):
        out.append(f'<text x="2" y="{height + 18 + 16 * i}">{_text(line)}</text>\n')
    out.append("</svg>\n")
    return "".join(out)


def _aggregation_note(tensors: int, blocks: int) -> str:
    side = int(math.sqrt(MIN_AREA))
    return (f"{tensors:,} tensors in {blocks:,} blocks are shown aggregated: modules too small "
            f"to show their parts, and \u201c(N smaller)\u201d groups of parts under "
            f"{side}\u00d7{side} px or 1/{BUDGET:,} of the picture.")
