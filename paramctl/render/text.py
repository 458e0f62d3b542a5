"""Output for people on a terminal: rich tables, trees and the progress bar.

The only module that imports rich, and only when it draws; machine formats never load it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from paramctl.model import FLOAT_DTYPES, ChangeResult, Inventory, ParamInfo, totals
from paramctl.render.common import (
    ShapeTexts,
    action_text,
    chunks,
    human_bytes,
    pct,
    summary_line,
    tree_rows,
)

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["ProgressBar", "changes", "footer_lines", "inventory", "tree"]


def _console(out: TextIO, width: int | None) -> Console:
    from rich.console import Console

    return Console(file=out, width=width, highlight=False, soft_wrap=False)


_TRAINABLE_STYLES = {"yes": "green", "no": "red", "partial": "yellow", "-": "dim",
                     "buffer": "dim"}


def _trainable_text(p: ParamInfo) -> str:
    if p.buffer:
        return "buffer"
    if p.dtype not in FLOAT_DTYPES:
        return "-"
    return "yes" if p.requires_grad else "no"


def _plain(texts: Sequence[str]) -> bool:
    """Cells rich prints exactly as given: printable ASCII (one column per character),
    nothing rich reads as markup (``[``) or as an emoji code (``:``)."""
    text = "".join(texts)
    return text.isascii() and text.isprintable() and "[" not in text and ":" not in text


def _draw(console: Console, out: TextIO, header: Sequence[str] | None,
          columns: Sequence[Sequence[str]], *, right: set[int],
          styles: dict[int, dict[str, str]], fold: bool = True) -> bool:
    """Write what ``console.print`` of rich's ``Table(box=None, pad_edge=False,
    header_style="bold")`` of these columns writes, byte for byte, without rich laying out
    each cell (a table of 100,000 rows took rich a minute). Returns ``False``, writing
    nothing, when that output is not certain: then rich draws the table.

    Certain means: plain cells (:func:`_plain`), and a table that fits the console or fits
    by narrowing the first column alone, whose cells then fold into lines of that width
    (``fold``), as rich's column-width rules and ``overflow="fold"`` do.
    """
    n, rows = len(columns), len(columns[0])
    if not rows or not all(map(_plain, columns)) or (header is not None and not _plain(header)):
        return False
    pads = [0] if n == 1 else [1] + [2] * (n - 2) + [1]  # padding (0, 1), no edge padding
    widths = [max(max(map(len, col)), len(header[i]) if header else 0)
              for i, col in enumerate(columns)]
    outer = [w + pad for w, pad in zip(widths, pads, strict=True)]
    if sum(outer) > console.width:
        from rich.table import Table

        narrowed = Table._collapse_widths(outer, [True] * n, console.width)
        if not fold or sum(narrowed) > console.width or narrowed[1:] != outer[1:]:
            return False
        widths[0] = narrowed[0] - pads[0]
        if widths[0] < 1 or (header is not None and len(header[0]) > widths[0]):
            return False
    from rich.style import Style

    def paint(text: str, style: str) -> str:
        parsed = Style.parse(style)
        if console.no_color:
            parsed = parsed.without_color
        return parsed.render(text, color_system=console._color_system,
                             legacy_windows=console.legacy_windows)

    def cell(text: str, i: int) -> str:
        return text.rjust(widths[i]) if i in right else text.ljust(widths[i])

    padded: list[list[str]] = []
    for i, col in enumerate(columns):
        style = styles.get(i)
        if style is not None or len(set(col)) * 4 < len(col):  # few values: pad each once
            once = {t: (paint(t, style[t]) + " " * (widths[i] - len(t)) if style and t in style
                        else cell(t, i)) for t in set(col)}
            padded.append(list(map(once.__getitem__, col)))
        elif i == 0:
            padded.append([t.ljust(widths[0]) for t in col])
        else:
            padded.append([cell(t, i) for t in col])
    width0 = widths[0]
    long_rows = [r for r, t in enumerate(columns[0]) if len(t) > width0]
    if long_rows:  # fold: the first line of the cell here, the rest on lines of their own
        blank = "".join("  " + " " * w for w in widths[1:])
        for r in long_rows:
            text = columns[0][r]
            padded[0][r] = text[:width0]
            rest = [text[k:k + width0].ljust(width0) + blank
                    for k in range(width0, len(text), width0)]
            padded[-1][r] += "\n" + "\n".join(rest)
    if header is not None:
        bold_gap = paint(" ", "bold") * 2
        out.write(bold_gap.join(paint(cell(h, i), "bold") for i, h in enumerate(header))
                  + "\n")
    lines = list(map("  ".join, zip(*padded, strict=True)))
    for chunk in chunks(lines):
        out.write("\n".join(chunk) + "\n")
    return True


def _trainable_cell(p: ParamInfo) -> str:
    if p.buffer:
        return "[dim]buffer[/]"
    if p.dtype not in FLOAT_DTYPES:
        return "[dim]-[/]"
    return "[green]yes[/]" if p.requires_grad else "[red]no[/]"


def inventory(inv: Inventory, out: TextIO, *, headers: bool, width: int | None) -> None:
    params = inv.params
    any_tied = any(p.tied for p in params)
    console = _console(out, width)
    shapes = ShapeTexts()
    columns = [[p.name for p in params], [shapes[p.shape] for p in params],
               [p.dtype for p in params], [f"{p.numel:,}" for p in params],
               [_trainable_text(p) for p in params]]
    if any_tied:
        columns.append([", ".join(p.tied) for p in params])
    names = ["name", "shape", "dtype", "params", "trainable", "tied with"][:len(columns)]
    if not _draw(console, out, names if headers else None, columns, right={3},
                 styles={4: _TRAINABLE_STYLES}):
        from rich.table import Table

        table = Table(show_header=headers, box=None, pad_edge=False, header_style="bold")
        table.add_column("name", overflow="fold")
        table.add_column("shape")
        table.add_column("dtype")
        table.add_column("params", justify="right")
        table.add_column("trainable")
        if any_tied:
            table.add_column("tied with", overflow="fold")
        for p in params:
            row = [p.name, shapes[p.shape], p.dtype, f"{p.numel:,}", _trainable_cell(p)]
            if any_tied:
                row.append(", ".join(p.tied))
            table.add_row(*row)
        console.print(table)
    if headers:
        for line in footer_lines(params) + extra_lines(inv):
            console.print(line)


def footer_lines(params: Sequence[ParamInfo]) -> list[str]:
    t = totals(params)
    tied = sum(1 for p in params if p.tied)
    lines = [
        f"[bold]{t.tensors} tensors[/], {t.numel:,} params, {human_bytes(t.nbytes)}"
        + (f" ({tied} tied names; shared tensors counted once)" if tied else ""),
        f"trainable {t.trainable:,} ({pct(t.trainable, t.numel)}) · "
        f"frozen {t.frozen:,} ({pct(t.frozen, t.numel)})",
    ]
    if t.by_dtype:
        lines.append("by dtype: " + ", ".join(
            f"{d} {human_bytes(b)}" for d, b in sorted(t.by_dtype.items())))
    from paramctl.memory import estimate

    lines.append(f"training AdamW fp32: {human_bytes(estimate(params).bytes.total)} "
                 "(with this frozen set)")
    return lines


def extra_lines(inv: Inventory) -> list[str]:
    """Footer lines for what the source says about itself: a PEFT adapter's config."""
    adapter = (inv.extra or {}).get("adapter")
    if not isinstance(adapter, dict):
        return []
    kind = adapter.get("peft_type") or "PEFT"
    label = "LoRA" if kind == "LORA" else str(kind)
    parts = []
    for key in ("r", "lora_alpha", "target_modules"):
        value = adapter.get(key)
        if value is not None:
            shown = ", ".join(value) if isinstance(value, list) else str(value)
            parts.append(f"{key}={shown}")
    base = adapter.get("base_model_name_or_path")
    if base:
        parts.append(f"base model {base}")
    from rich.markup import escape

    # Values come from the file: keep them one line, and never read as rich markup.
    text = "".join(c if c.isprintable() else " " for c in f"{label} adapter: "
                   f"{', '.join(parts)}")
    return [escape(text)]


def tree(inv: Inventory, out: TextIO, *, depth: int | None = None, headers: bool = True,
         width: int | None = None) -> None:
    rows = tree_rows(inv.params, depth)
    labels = [r.module if r.depth == 0 else "  " * (r.depth - 1) + r.module.rsplit(".", 1)[-1]
              for r in rows]
    columns = [labels, [f"{r.numel:,}" for r in rows], [human_bytes(r.nbytes) for r in rows],
               [r.trainable for r in rows]]
    console = _console(out, width)
    # A label's leading spaces are its depth: rich would wrap a narrowed column on them,
    # so only a tree that fits is drawn without rich (``fold=False``).
    if _draw(console, out, ["module", "params", "size", "trainable"] if headers else None,
             columns, right={1, 2}, styles={3: _TRAINABLE_STYLES}, fold=False):
        return
    from rich.table import Table

    colour = {"yes": "[green]yes[/]", "no": "[red]no[/]", "partial": "[yellow]partial[/]",
              "-": "[dim]-[/]"}
    table = Table(show_header=headers, box=None, pad_edge=False, header_style="bold")
    table.add_column("module", overflow="fold")
    table.add_column("params", justify="right")
    table.add_column("size", justify="right")
    table.add_column("trainable")
    for label, r in zip(labels, rows, strict=True):
        table.add_row(label, f"{r.numel:,}", human_bytes(r.nbytes), colour[r.trainable])
    console.print(table)


def changes(result: ChangeResult, out: TextIO, *, dry_run: bool, headers: bool = True,
            width: int | None = None) -> None:
    items = result.changes
    from rich.table import Table

    console = _console(out, width)
    if items:
        table = Table(show_header=headers, box=None, pad_edge=False, header_style="bold")
        table.add_column("name", overflow="fold")
        table.add_column("shape")
        table.add_column("dtype")
        table.add_column("change")
        table.add_column("note", overflow="fold")
        for c in items:
            note = f"tied with {c.via}" if c.via else ""
            table.add_row(c.name, "x".join(map(str, c.shape)) or "scalar", c.dtype,
                          action_text(c.action), note)
        console.print(table)
    out.write(summary_line(result, dry_run=dry_run) + "\n")




class ProgressBar:
    """A stderr progress bar that appears only for writes longer than about a second."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.total = 0
        self.label = label
        self.enabled = enabled and sys.stderr.isatty()
        self.done = 0
        self.start = time.monotonic()
        self._bar: Any = None
        self._task: Any = None

    def __call__(self, n: int, total: int) -> None:
        self.done += n
        self.total = total
        if not self.enabled:
            return
        if self._bar is None:
            if time.monotonic() - self.start < 1.0:
                return
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

            self._bar = Progress("{task.description}", BarColumn(), DownloadColumn(),
                                 TimeRemainingColumn(), console=Console(stderr=True),
                                 transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total)
        self._bar.update(self._task, completed=self.done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
