"""Golden outputs for the human table and tree of ``paramctl list``.

The rendered text (width 100, no colour: rich writes no ANSI codes to a StringIO) is
compared exactly with the files in ``tests/golden/``. After an intended change of the
rendering, regenerate them and review the diff:

    PARAMCTL_REGEN_GOLDEN=1 python -m pytest tests/test_golden.py

Besides the exact comparison, semantic checks parse the rendered text and verify that the
footer totals equal the sums of the rows (tied tensors counted once) and that every tree row
rolls up the rows of the table beneath it.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import run_cli

from paramctl.core import inspect
from paramctl.model import Inventory
from paramctl.render import human_bytes, render_inventory, render_tree
from paramctl.sources.base import OpenOptions

GOLDEN = Path(__file__).resolve().parent / "golden"
REGEN = os.environ.get("PARAMCTL_REGEN_GOLDEN") == "1"
WIDTH = 100
DTYPE_SIZE = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "int64": 8}

Sample = Callable[[str], Path]


@pytest.fixture(autouse=True)
def _plain_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Environment variables that would make rich emit colour or change layout."""
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS", "LINES",
                "JUPYTER_COLUMNS", "JUPYTER_LINES"):
        monkeypatch.delenv(var, raising=False)


def table_text(inv: Inventory, *, headers: bool = True) -> str:
    out = io.StringIO()
    render_inventory(inv, "table", out, headers=headers, width=WIDTH)
    return out.getvalue()


def tree_text(inv: Inventory, depth: int | None = None) -> str:
    out = io.StringIO()
    render_tree(inv, "table", out, depth=depth, width=WIDTH)
    return out.getvalue()


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if REGEN:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    assert path.exists(), f"missing {path}; run with PARAMCTL_REGEN_GOLDEN=1 to create it"
    expected = path.read_text(encoding="utf-8")
    assert text == expected, f"{name} differs from the golden file"


def assert_plain(text: str) -> None:
    assert "\x1b" not in text  # no ANSI escapes
    assert "[green]" not in text and "[/" not in text  # markup was interpreted
    assert all(len(line) <= WIDTH for line in text.splitlines())


# -- parsing the rendered text -----------------------------------------------------------------
@dataclass
class Row:
    name: str
    shape: str
    dtype: str
    params: int
    trainable: str  # yes / no / - / buffer
    tied: tuple[str, ...]


@dataclass
class Footer:
    tensors: int
    params: int
    size: str
    tied_names: int
    trainable: int
    trainable_pct: str
    frozen: int
    frozen_pct: str
    by_dtype: dict[str, str]
    training: str  # AdamW fp32 estimate, human-readable


def cells(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


def parse_table(text: str) -> tuple[list[Row], Footer]:
    lines = text.splitlines()
    header = cells(lines[0])
    assert header[:5] == ["name", "shape", "dtype", "params", "trainable"]
    has_tied = header[5:] == ["tied with"]
    first_footer = next(i for i, line in enumerate(lines) if re.match(r"\d+ tensors, ", line))
    rows = []
    for line in lines[1:first_footer]:
        c = cells(line)
        tied = tuple(c[5].split(", ")) if has_tied and len(c) > 5 else ()
        rows.append(Row(c[0], c[1], c[2], int(c[3].replace(",", "")), c[4], tied))
    m1 = re.fullmatch(r"(\d+) tensors, ([\d,]+) params, (.+?)"
                      r"(?: \((\d+) tied names[^)]*\))?", lines[first_footer])
    m2 = re.fullmatch(r"trainable ([\d,]+) \((.+)\) · frozen ([\d,]+) \((.+)\)",
                      lines[first_footer + 1])
    m3 = re.fullmatch(r"by dtype: (.+)", lines[first_footer + 2])
    m4 = re.fullmatch(r"training AdamW fp32: (.+) \(with this frozen set\)",
                      lines[first_footer + 3])
    assert m1 and m2 and m3 and m4, lines[first_footer:]
    by_dtype = dict(part.split(" ", 1) for part in m3[1].split(", "))
    footer = Footer(int(m1[1]), int(m1[2].replace(",", "")), m1[3], int(m1[4] or 0),
                    int(m2[1].replace(",", "")), m2[2], int(m2[3].replace(",", "")), m2[4],
                    by_dtype, m4[1])
    assert len(lines) == first_footer + 4
    return rows, footer


def unique(rows: list[Row]) -> list[Row]:
    """Rows with every tied group counted once (by its first row)."""
    seen: set[str] = set()
    out = []
    for r in rows:
        if not any(t in seen for t in r.tied):
            out.append(r)
        seen.add(r.name)
    return out


def parse_tree(text: str) -> list[tuple[str, int, str, str]]:
    """(full module path, params, size, trainable) per row, paths rebuilt from indents."""
    lines = text.splitlines()
    assert cells(lines[0]) == ["module", "params", "size", "trainable"]
    out = []
    stack: list[str] = []
    for line in lines[1:]:
        c = cells(line)
        if c[0] == "(all)":
            out.append(("(all)", int(c[1].replace(",", "")), c[2], c[3]))
            continue
        depth = (len(line) - len(line.lstrip())) // 2
        stack = [*stack[:depth], c[0]]
        out.append((".".join(stack), int(c[1].replace(",", "")), c[2], c[3]))
    return out


# -- semantic checks ---------------------------------------------------------------------------
def check_table_sums(text: str) -> list[Row]:
    rows, footer = parse_table(text)
    assert footer.tensors == len(rows)
    assert footer.tied_names == sum(1 for r in rows if r.tied)
    for r in rows:  # tied names point at each other
        for t in r.tied:
            partner = next(x for x in rows if x.name == t)
            assert r.name in partner.tied
            assert (partner.shape, partner.dtype, partner.params) == (r.shape, r.dtype,
                                                                     r.params)
    once = unique(rows)
    assert footer.params == sum(r.params for r in once)
    assert footer.trainable == sum(r.params for r in once if r.trainable == "yes")
    # frozen = what `--frozen` lists: parameters that are not trainable (never buffers)
    assert footer.frozen == sum(r.params for r in once if r.trainable == "no")
    total_bytes = sum(r.params * DTYPE_SIZE[r.dtype] for r in once)
    assert footer.size == human_bytes(total_bytes)
    per_dtype: dict[str, int] = {}
    for r in once:
        per_dtype[r.dtype] = per_dtype.get(r.dtype, 0) + r.params * DTYPE_SIZE[r.dtype]
    assert footer.by_dtype == {d: human_bytes(b) for d, b in sorted(per_dtype.items())}
    assert footer.trainable_pct == f"{100 * footer.trainable / footer.params:.1f}%"
    assert footer.frozen_pct == f"{100 * footer.frozen / footer.params:.1f}%"
    # AdamW fp32: 4 bytes a parameter, 16 when it trains; buffers and integers as stored
    training = sum(r.params * (16 if r.trainable == "yes" else 4) if r.trainable in ("yes", "no")
                   else r.params * DTYPE_SIZE[r.dtype] for r in once)
    assert footer.training == human_bytes(training)
    return rows


def check_tree_against_rows(tree: str, rows: list[Row]) -> None:
    modules = parse_tree(tree)
    assert modules[0][0] == "(all)"
    for module, params, size, trainable in modules:
        under = rows if module == "(all)" else [
            r for r in rows if r.name.startswith(module + ".")]
        assert under, module
        once = unique(under)
        assert params == sum(r.params for r in once), module
        assert size == human_bytes(sum(r.params * DTYPE_SIZE[r.dtype] for r in once)), module
        flags = {r.trainable for r in under} & {"yes", "no"}
        want = "-" if not flags else "partial" if len(flags) == 2 else flags.pop()
        assert trainable == want, module


# -- the golden outputs ------------------------------------------------------------------------
@pytest.fixture
def transformer_inv(samples_dir: Path) -> Inventory:
    return inspect(str(samples_dir / "transformer.pt"))


@pytest.fixture
def cnn_inv() -> Inventory:
    return inspect("sample_models.cnn:SmallCNN", options=OpenOptions(buffers=True))


def test_transformer_table(transformer_inv: Inventory) -> None:
    text = table_text(transformer_inv)
    assert_plain(text)
    check_golden("list_transformer_pt.txt", text)


def test_transformer_tree(transformer_inv: Inventory) -> None:
    text = tree_text(transformer_inv)
    assert_plain(text)
    check_golden("tree_transformer_pt.txt", text)


def test_cnn_buffers_table(cnn_inv: Inventory) -> None:
    text = table_text(cnn_inv)
    assert_plain(text)
    check_golden("list_cnn_module_buffers.txt", text)


def test_cnn_buffers_tree(cnn_inv: Inventory) -> None:
    text = tree_text(cnn_inv)
    assert_plain(text)
    check_golden("tree_cnn_module_buffers.txt", text)


def test_partly_frozen_transformer(sample: Sample) -> None:
    path = sample("transformer.pt")
    res = run_cli("freeze", path, "blocks.0.attn", "embed", "-q")
    assert res.returncode == 0, res.stderr
    inv = inspect(str(path))
    table = table_text(inv)
    tree = tree_text(inv, depth=2)
    assert_plain(table + tree)
    check_golden("list_transformer_partly_frozen.txt", table)
    check_golden("tree_transformer_partly_frozen_depth2.txt", tree)


def test_table_without_headers(transformer_inv: Inventory) -> None:
    text = table_text(transformer_inv, headers=False)
    lines = text.splitlines()
    assert len(lines) == len(transformer_inv.params)  # no header row, no footer
    assert lines[0].startswith("embed.weight ")


# -- semantic checks on the same renderings ----------------------------------------------------
def test_transformer_footer_equals_row_sums(transformer_inv: Inventory) -> None:
    rows = check_table_sums(table_text(transformer_inv))
    assert [r.name for r in rows] == [p.name for p in transformer_inv.params]
    tied = {r.name: r.tied for r in rows if r.tied}
    assert tied == {"embed.weight": ("lm_head.weight",), "lm_head.weight": ("embed.weight",)}


def test_transformer_tree_rolls_up_rows(transformer_inv: Inventory) -> None:
    rows = check_table_sums(table_text(transformer_inv))
    check_tree_against_rows(tree_text(transformer_inv), rows)
    check_tree_against_rows(tree_text(transformer_inv, depth=1), rows)


def test_cnn_buffers_footer_equals_row_sums(cnn_inv: Inventory) -> None:
    rows = check_table_sums(table_text(cnn_inv))
    assert sum(1 for r in rows if r.trainable == "buffer") == 6


def test_cnn_buffers_tree_rolls_up_rows(cnn_inv: Inventory) -> None:
    rows, _ = parse_table(table_text(cnn_inv))
    check_tree_against_rows(tree_text(cnn_inv), rows)


def test_cnn_file_footer_equals_row_sums(samples_dir: Path) -> None:
    inv = inspect(str(samples_dir / "cnn.pt"))
    rows = check_table_sums(table_text(inv))
    # A file's BatchNorm statistics are buffers by name (DESIGN, "What trainable means in
    # a file"), the integer counter included.
    shown = {r.name: r.trainable for r in rows}
    assert shown["features.1.num_batches_tracked"] == "buffer"
    assert shown["features.1.running_mean"] == shown["features.4.running_var"] == "buffer"
    check_tree_against_rows(tree_text(inv), rows)


def test_safetensors_tree_rolls_up_rows(samples_dir: Path) -> None:
    """A safetensors header orders tensors by dtype, so modules arrive interleaved
    (``features.1.num_batches_tracked`` first); each tree row must still sit under its
    own parent."""
    inv = inspect(str(samples_dir / "cnn.safetensors"))
    rows = check_table_sums(table_text(inv))
    check_tree_against_rows(tree_text(inv), rows)


def test_partly_frozen_sums(sample: Sample) -> None:
    path = sample("transformer.pt")
    res = run_cli("freeze", path, "blocks.1.mlp", "-q")
    assert res.returncode == 0, res.stderr
    inv = inspect(str(path))
    rows = check_table_sums(table_text(inv))
    assert {r.name for r in rows if r.trainable == "no"} == {
        "blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc1.bias", "blocks.1.mlp.fc2.weight",
        "blocks.1.mlp.fc2.bias"}
    check_tree_against_rows(tree_text(inv), rows)
    tree = {m: t for m, _, _, t in parse_tree(tree_text(inv))}
    assert tree["blocks.1"] == "partial"
    assert tree["blocks.1.mlp"] == "no"
    assert tree["blocks.0"] == "yes"
