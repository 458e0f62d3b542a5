"""Every output paramctl prints, by kind: ``text`` (rich tables and trees for people),
``machine`` (TSV, JSON, JSONL, names for programs) and ``picture`` (an HTML page and an SVG
treemap). Commands call the dispatchers here; only ``render/text.py`` imports rich."""

from __future__ import annotations

from typing import TextIO

from paramctl.model import ChangeResult, Inventory
from paramctl.render.common import human_bytes

__all__ = [
    "FORMATS", "LIST_FORMATS", "PICTURE_FORMATS", "human_bytes", "render_changes",
    "render_inventory", "render_tree",
]

FORMATS = ("table", "tsv", "json", "jsonl", "names")
PICTURE_FORMATS = ("html", "svg")
LIST_FORMATS = (*FORMATS, *PICTURE_FORMATS)


def render_inventory(inv: Inventory, fmt: str, out: TextIO, *, headers: bool = True,
                     width: int | None = None) -> None:
    if fmt == "table":
        from paramctl.render import text

        text.inventory(inv, out, headers=headers, width=width)
    elif fmt in PICTURE_FORMATS:
        from paramctl.render import picture

        out.write(picture.list_html(inv) if fmt == "html" else picture.list_svg(inv))
    else:
        from paramctl.render import machine

        machine.inventory(inv, fmt, out, headers=headers)


def render_tree(inv: Inventory, fmt: str, out: TextIO, *, depth: int | None = None,
                headers: bool = True, width: int | None = None) -> None:
    if fmt == "table":
        from paramctl.render import text

        text.tree(inv, out, depth=depth, headers=headers, width=width)
    else:
        from paramctl.render import machine

        machine.tree(inv, fmt, out, depth=depth, headers=headers)


def render_changes(result: ChangeResult, fmt: str, out: TextIO, *, dry_run: bool,
                   headers: bool = True, width: int | None = None) -> None:
    if fmt == "table":
        from paramctl.render import text

        text.changes(result, out, dry_run=dry_run, headers=headers, width=width)
    else:
        from paramctl.render import machine

        machine.changes(result, fmt, out, dry_run=dry_run, headers=headers)
