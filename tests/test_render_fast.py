"""The human table and tree are drawn without rich's per-cell layout, byte for byte as rich
draws them (colour included), whenever that is certain; rich draws the rest.

rich is the reference here: the same columns go through ``rich.table.Table`` and through
``paramctl.render.text._draw`` at many widths, with and without colour.
"""

from __future__ import annotations

import io
import os
import random
import time
from collections.abc import Sequence

import pytest
from rich.console import Console
from rich.table import Table

from paramctl.model import ParamInfo
from paramctl.render import common, render_inventory, render_tree
from paramctl.render.text import _TRAINABLE_STYLES, _draw, _trainable_cell
from paramctl.sources.base import OpenOptions

STYLE_MARKUP = {t: f"[{s}]{t}[/]" for t, s in _TRAINABLE_STYLES.items()}


def console(width: int, colour: str | None) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    if colour is None:
        return Console(file=out, width=width, highlight=False, soft_wrap=False), out
    return Console(file=out, width=width, highlight=False, soft_wrap=False,
                   force_terminal=True, color_system=colour), out  # type: ignore[arg-type]


def by_rich(header: Sequence[str] | None, columns: list[list[str]], right: set[int],
            styled: int, width: int, colour: str | None) -> str:
    con, out = console(width, colour)
    table = Table(show_header=header is not None, box=None, pad_edge=False,
                  header_style="bold")
    for i, name in enumerate(header or [f"c{i}" for i in range(len(columns))]):
        table.add_column(name, justify="right" if i in right else "left",
                         overflow="fold" if i == 0 else "ellipsis")
    for row in zip(*columns, strict=True):
        table.add_row(*(STYLE_MARKUP[c] if i == styled else c for i, c in enumerate(row)))
    con.print(table)
    return out.getvalue()


def by_draw(header: Sequence[str] | None, columns: list[list[str]], right: set[int],
            styled: int, width: int, colour: str | None, fold: bool = True) -> str | None:
    con, out = console(width, colour)
    if not _draw(con, out, header, columns, right=right, styles={styled: _TRAINABLE_STYLES},
                 fold=fold):
        assert out.getvalue() == ""
        return None
    return out.getvalue()


@pytest.mark.parametrize("colour", [None, "standard", "truecolor"])
def test_random_tables_match_rich(colour: str | None) -> None:
    rng = random.Random(str(colour))
    drawn = 0
    for _ in range(150):
        rows = rng.randint(1, 12)
        word = "abcdefghij._0123456789"
        names = ["".join(rng.choice(word) for _ in range(rng.randint(1, 40)))
                 for _ in range(rows)]
        shapes = [rng.choice(["4x4", "2048x5504", "scalar", "7"]) for _ in range(rows)]
        counts = [f"{rng.randint(0, 10**rng.randint(0, 10)):,}" for _ in range(rows)]
        flags = [rng.choice(list(_TRAINABLE_STYLES)) for _ in range(rows)]
        columns = [names, shapes, counts, flags]
        header = ["name", "shape", "params", "trainable"] if rng.random() < 0.8 else None
        width = rng.randint(12, 90)
        got = by_draw(header, columns, {2}, 3, width, colour)
        if got is not None:
            drawn += 1
            assert got == by_rich(header, columns, {2}, 3, width, colour), (columns, width)
    assert drawn > 50


def test_cells_rich_reads_as_markup_are_left_to_rich() -> None:
    for name in ("a.[b]", "emoji:smile:", "tab\there", "é.weight", "line\nbreak"):
        assert by_draw(["name", "t"], [[name], ["yes"]], set(), 1, 80, None) is None


def _params(n: int) -> list[ParamInfo]:
    return [ParamInfo(f"model.layers.{i // 24}.mlp.experts.{i // 3 % 8}.{'gud'[i % 3]}_proj"
                      ".weight", (4, 4), "bfloat16", 16, 32, i % 5 != 0) for i in range(n)]


def _old_tree(params: list[ParamInfo], width: int, depth: int | None) -> str:
    """The tree as rich alone draws it (paramctl 0.1)."""
    con, out = console(width, None)
    table = Table(show_header=True, box=None, pad_edge=False, header_style="bold")
    table.add_column("module", overflow="fold")
    table.add_column("params", justify="right")
    table.add_column("size", justify="right")
    table.add_column("trainable")
    for r in common.tree_rows(params, depth):
        label = r.module if r.depth == 0 else "  " * (r.depth - 1) + r.module.rsplit(".", 1)[-1]
        table.add_row(label, f"{r.numel:,}", common.human_bytes(r.nbytes),
                      STYLE_MARKUP[r.trainable])
    con.print(table)
    return out.getvalue()


@pytest.mark.parametrize("width", [30, 60, 120])
def test_tree_matches_rich(width: int, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("COLUMNS", "FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(var, raising=False)
    from paramctl.model import Inventory

    params = _params(300)
    for depth in (None, 2):
        out = io.StringIO()
        render_tree(Inventory("x", "safetensors", params), "table", out, depth=depth,
                    width=width)
        assert out.getvalue() == _old_tree(params, width, depth)


def test_untied_tree_rows_match_the_general_rule() -> None:
    """The sum-per-module tree equals the per-module totals of every parameter beneath."""
    rng = random.Random(0)
    for _ in range(300):
        names = {".".join(rng.choice(["a", "b", "c", ""]) for _ in range(rng.randint(1, 4)))
                 for _ in range(rng.randint(0, 30))}
        params = [ParamInfo(n, (2,), rng.choice(["float32", "int64"]), rng.randint(0, 9), 8,
                            rng.random() < .5, buffer=rng.random() < .1)
                  for n in sorted(names) if not n.startswith(".")]
        rng.shuffle(params)
        tied = [ParamInfo("zz.t", (2,), "float32", 0, 0, True, tied=("zz.u",)),
                ParamInfo("zz.u", (2,), "float32", 0, 0, True, tied=("zz.t",))]
        for depth in (None, 1, 2, 3):
            fast = common.tree_rows(params, depth)  # untied: the fast rule
            general = common.tree_rows(params + tied, depth)  # tied: the general rule
            general = [r for r in general if not r.module.startswith("zz")]
            for r in general:
                if r.module == "(all)":
                    r.trainable = fast[0].trainable  # zz's flags join the root's
            assert fast == general, (params, depth)


def test_a_large_table_is_fast(tmp_path: object) -> None:
    """100,000 rows in a second or two (rich took a minute); a smoke test, not a benchmark."""
    from paramctl.model import Inventory

    inv = Inventory("x", "safetensors", _params(100_000))
    t0 = time.process_time()
    render_inventory(inv, "table", io.StringIO(), headers=True, width=80)
    render_tree(inv, "table", io.StringIO(), width=80)
    assert time.process_time() - t0 < 30
    assert os.environ.get("PARAMCTL_BENCH_STRICT") is None or time.process_time() - t0 < 3


def test_sample_tables_match_rich(samples_dir: object) -> None:
    from pathlib import Path

    from paramctl.core import inspect

    for name in ("transformer.pt", "cnn.safetensors", "llama.safetensors"):
        inv = inspect(str(Path(str(samples_dir)) / name), options=OpenOptions())
        for width in (40, 70, 100, 200):
            out = io.StringIO()
            render_inventory(inv, "table", out, headers=True, width=width)
            con, ref = console(width, None)
            table = Table(show_header=True, box=None, pad_edge=False, header_style="bold")
            for col, kw in (("name", {"overflow": "fold"}), ("shape", {}), ("dtype", {}),
                            ("params", {"justify": "right"}), ("trainable", {})):
                table.add_column(col, **kw)  # type: ignore[arg-type]
            tied = any(p.tied for p in inv.params)
            if tied:
                table.add_column("tied with", overflow="fold")
            for p in inv.params:
                row = [p.name, p.shape_text, p.dtype, f"{p.numel:,}", _trainable_cell(p)]
                if tied:
                    row.append(", ".join(p.tied))
                table.add_row(*row)
            con.print(table)
            assert out.getvalue().startswith(ref.getvalue()), (name, width)
