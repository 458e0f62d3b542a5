"""Output for people on a terminal: rich tables, trees and the progress bar.

The only module that imports rich, and only when it draws; machine formats never load it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from paramctl.model import FLOAT_DTYPES, ChangeResult, Inventory, ParamInfo, totals
from paramctl.render.common import action_text, human_bytes, pct, summary_line, tree_rows

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["ProgressBar", "changes", "footer_lines", "inventory", "tree"]


def _console(out: TextIO, width: int | None) -> Console:
    from rich.console import Console

    return Console(file=out, width=width, highlight=False, soft_wrap=False)


def _trainable_cell(p: ParamInfo) -> str:
    if p.buffer:
        return "[dim]buffer[/]"
    if p.dtype not in FLOAT_DTYPES:
        return "[dim]-[/]"
    return "[green]yes[/]" if p.requires_grad else "[red]no[/]"


def inventory(inv: Inventory, out: TextIO, *, headers: bool, width: int | None) -> None:
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
