"""Pictures: the squarified treemap layout, the SVG, and the HTML page in a real headless
Chromium (Selenium + chromedriver, no mocks).

The browser tests load each page from a ``file://`` path and check what a user sees: no
console error and no network request, top-level modules as labelled rectangles sized by
bytes, the tooltip, the filter, sorting, zooming, a 100,000-tensor page, and names that
try to inject HTML. Screenshots go to each test's ``tmp_path`` (the path is printed).
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import run_inproc

from paramctl.core import inspect
from paramctl.model import Inventory, ParamInfo, counted_once
from paramctl.render.picture import diff_html, list_html, list_svg
from paramctl.render.treemap import (
    BUDGET,
    Node,
    Rect,
    build_tree,
    inner_rect,
    layout,
    module_tree,
    squarify,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WINDOW = (1280, 1000)
SVG_NS = "{http://www.w3.org/2000/svg}"

Sample = Callable[[str], Path]


# -- the layout ----------------------------------------------------------------------------
def overlap(a: Rect, b: Rect) -> float:
    w = min(a.x + a.w, b.x + b.w) - max(a.x, b.x)
    h = min(a.y + a.h, b.y + b.h) - max(a.y, b.y)
    return max(w, 0.0) * max(h, 0.0)


def inside(r: Rect, outer: Rect, eps: float = 1e-6) -> bool:
    return (r.x >= outer.x - eps and r.y >= outer.y - eps
            and r.x + r.w <= outer.x + outer.w + eps and r.y + r.h <= outer.y + outer.h + eps)


def aspect(r: Rect) -> float:
    return max(r.w / r.h, r.h / r.w)


def slice_layout(weights: list[float], rect: Rect) -> list[Rect]:
    """The naive layout squarify improves on: strips along the longer side."""
    total, out, x = sum(weights), [], rect.x
    for w in weights:
        width = rect.w * w / total
        out.append(Rect(x, rect.y, width, rect.h))
        x += width
    return out


WEIGHT_SETS = [
    [6.0, 6.0, 4.0, 3.0, 2.0, 2.0, 1.0],  # the paper's example
    [1.0] * 37,
    [2.0 ** -k for k in range(20)],
    [random.Random(0).lognormvariate(0, 2) for _ in range(200)],
    *([random.Random(seed).uniform(1, 100) for _ in range(n)]
      for seed, n in ((1, 2), (2, 13), (3, 500))),
]


@pytest.mark.parametrize("weights", WEIGHT_SETS, ids=lambda w: f"{len(w)}")
@pytest.mark.parametrize("rect", [Rect(0.0, 0.0, 600.0, 400.0), Rect(10.0, 20.0, 90.0, 700.0)],
                         ids=["wide", "tall"])
def test_squarify_areas_proportional_inside_and_disjoint(weights: list[float],
                                                         rect: Rect) -> None:
    rects = squarify(weights, rect)
    assert len(rects) == len(weights)
    total = sum(weights)
    for w, r in zip(weights, rects, strict=True):
        assert r.area == pytest.approx(rect.area * w / total, rel=1e-9, abs=1e-9)
        assert inside(r, rect)
    assert sum(r.area for r in rects) == pytest.approx(rect.area, rel=1e-12)
    if len(rects) <= 200:  # pairwise check; the sum of areas above covers the rest
        for i, a in enumerate(rects):
            for b in rects[i + 1:]:
                assert overlap(a, b) <= 1e-6 * rect.area


@pytest.mark.parametrize("weights", WEIGHT_SETS, ids=lambda w: f"{len(w)}")
def test_squarify_is_squarer_than_slicing(weights: list[float]) -> None:
    rect = Rect(0.0, 0.0, 800.0, 500.0)
    ordered = sorted(weights, reverse=True)
    ours = [aspect(r) for r in squarify(ordered, rect)]
    naive = [aspect(r) for r in slice_layout(ordered, rect)]
    assert sum(ours) / len(ours) <= sum(naive) / len(naive)
    if len(weights) > 2:
        assert sum(ours) / len(ours) < 0.5 * sum(naive) / len(naive)
    # The paper's example: every rectangle within 3:1.
    if weights == WEIGHT_SETS[0]:
        assert max(aspect(r) for r in squarify(weights, Rect(0.0, 0.0, 6.0, 4.0))) < 3


def test_squarify_is_deterministic_keeps_input_order_and_skips_zero() -> None:
    weights = [3.0, 0.0, 5.0, 3.0, 1.0]
    rect = Rect(0.0, 0.0, 300.0, 200.0)
    first = squarify(weights, rect)
    assert first == squarify(list(weights), rect)
    assert first[1].area == 0
    assert first[2].area > first[0].area == pytest.approx(first[3].area)
    # Equal weights keep their relative order (a stable sort).
    assert (first[0].x, first[0].y) <= (first[3].x, first[3].y)
    assert squarify([], rect) == []
    assert all(r.area == 0 for r in squarify([1.0, 2.0], Rect(0.0, 0.0, 0.0, 10.0)))


def params_of(names_bytes: list[tuple[str, int]], **kw: Any) -> list[ParamInfo]:
    return [ParamInfo(n, (b // 4,), "float32", b // 4, b, True, **kw) for n, b in names_bytes]


def test_module_tree_counts_tied_once_and_rolls_up_state() -> None:
    params = [
        ParamInfo("embed.weight", (10, 4), "float32", 40, 160, True, tied=("head.weight",)),
        ParamInfo("enc.0.w", (4, 4), "float32", 16, 64, False),
        ParamInfo("enc.0.b", (4,), "float32", 4, 16, True),
        ParamInfo("enc.1.w", (4, 4), "float32", 16, 64, False),
        ParamInfo("enc.1.steps", (), "int64", 1, 8, False),
        ParamInfo("bn.running_mean", (4,), "float32", 4, 16, False, buffer=True),
        ParamInfo("head.weight", (10, 4), "float32", 40, 160, True, tied=("embed.weight",)),
    ]
    root, modules, leaves = module_tree(params)
    assert root.weight == 160 + 64 + 16 + 64 + 8 + 16  # head.weight counted at embed.weight
    assert root.tensors == 7
    assert root.numel == 40 + 16 + 4 + 16 + 1 + 4
    by_label = {n.label: n for n in root.children}
    # Single-child modules fold into their child: "embed" > "weight" is one tensor node.
    assert set(by_label) == {"embed.weight", "enc", "bn.running_mean", "head.weight"}
    assert by_label["head.weight"].weight == 0
    assert by_label["enc"].state == "partial"
    enc = {n.label: n for n in by_label["enc"].children}
    assert enc["0"].state == "partial" and enc["1"].state == "frozen"
    assert by_label["bn.running_mean"].state == "none"
    assert by_label["embed.weight"].state == "trainable"
    assert [m.name for m in modules] == ["enc", "enc.0", "enc.1"]
    assert [leaf.name for leaf in leaves] == [p.name for p in params]
    # The counted-once rule is the one totals uses.
    assert counted_once(params) == [True] * 6 + [False]


def test_build_tree_handles_odd_names() -> None:
    names = ["", ".x", "a..b", "a.b", "a.b.c", "x"]
    root, _, leaves = build_tree(names, [1.0] * len(names))
    assert root.weight == 6
    # Every leaf's name is its ancestors' labels joined by dots (what the page rebuilds).
    for leaf in leaves:
        parts = []
        node: Node | None = leaf
        while node is not None and node is not root:
            parts.append(node.label)
            node = node.parent
        assert ".".join(reversed(parts)) == leaf.name


def tree_of(n_layers: int, per_layer: int, size: int = 4096) -> Node:
    names = [f"layers.{i}.e.{j}.w" for i in range(n_layers) for j in range(per_layer)]
    return build_tree(names, [float(size)] * len(names))[0]


def check_nesting(tm_tiles: list[Any], rect: Rect) -> None:
    parents: dict[int, Any] = {}
    for tile in tm_tiles:
        parent_tile = parents.get(id(tile.node.parent))
        if parent_tile is None:
            assert inside(tile.rect, rect)
        else:
            spot = inner_rect(parent_tile.rect)
            assert spot is not None
            assert inside(tile.rect, spot[0])
        if not tile.leaf:
            parents[id(tile.node)] = tile


def test_layout_nests_children_inside_parents_and_fills_them() -> None:
    rect = Rect(0.0, 0.0, 1200.0, 720.0)
    root = tree_of(4, 8)
    tm = layout(root, rect)
    check_nesting(tm.tiles, rect)
    assert tm.aggregated_tensors == 0 and tm.aggregated_blocks == 0
    top = [t for t in tm.tiles if t.depth == 1]
    assert sum(t.rect.area for t in top) == pytest.approx(rect.area)
    for tile in tm.tiles:
        if not tile.leaf:
            spot = inner_rect(tile.rect)
            assert spot is not None
            kids = [t for t in tm.tiles if t.node.parent is tile.node]
            assert sum(k.rect.area for k in kids) == pytest.approx(spot[0].area)
    assert layout(root, rect).tiles[5].rect == tm.tiles[5].rect  # deterministic


def test_layout_merges_small_children_into_one_block() -> None:
    names = ["big.w"] + [f"small.{i}" for i in range(300)]
    weights = [1e6] + [1.0] * 300
    root = build_tree(names, weights)[0]
    tm = layout(root, Rect(0.0, 0.0, 400.0, 300.0))
    labels = [t.node.label for t in tm.tiles]
    assert "big.w" in labels
    small = next(t for t in tm.tiles if t.node.label == "small")
    assert small.leaf  # too small to show its 300 children: one block
    assert tm.aggregated_tensors == 300 and tm.aggregated_blocks == 1
    # Mixed sizes inside one module: the visible ones drawn, the rest one "(N smaller)".
    root = build_tree(["m.a", "m.b"] + [f"m.t{i}" for i in range(50)],
                      [5e5, 4e5] + [1.0] * 50)[0]
    tm = layout(root, Rect(0.0, 0.0, 400.0, 300.0))
    assert [t.node.label for t in tm.tiles if t.depth == 2] == ["a", "b", "(50 smaller)"]
    more = tm.tiles[-1].node
    assert more.kind == "more" and more.tensors == 50 and more.weight == 50


def test_layout_respects_the_budget_and_zooming_into_a_block_splits_it() -> None:
    rect = Rect(0.0, 0.0, 1200.0, 720.0)
    flat = build_tree([f"t{i}" for i in range(20000)], [1.0] * 20000)[0]
    tm = layout(flat, rect)
    assert len(tm.tiles) <= BUDGET
    assert tm.aggregated_tensors == 20000
    blocks = [t for t in tm.tiles if t.node.kind == "more"]
    assert len(blocks) > 1  # split into groups a user can zoom into, not one block
    assert all(t.rect.area >= 16 for t in tm.tiles)
    inner = layout(blocks[0].node, rect)
    assert inner.aggregated_tensors < tm.aggregated_tensors
    tm = layout(tree_of(64, 512), rect)
    assert len(tm.tiles) <= BUDGET
    assert all(t.rect.area >= 16 or t.node.kind == "more" for t in tm.tiles)


def moe_params(layers: int = 64, experts: int = 512) -> list[ParamInfo]:
    """64 layers x 512 experts x 3 projections = 98,304 tensors, half the layers frozen."""
    out = []
    for layer in range(layers):
        for e in range(experts):
            for proj, shape in (("gate_proj", (256, 128)), ("up_proj", (256, 128)),
                                ("down_proj", (128, 256))):
                out.append(ParamInfo(f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight",
                                     shape, "bfloat16", 32768, 65536, layer % 2 == 0))
    return out


# -- the SVG -----------------------------------------------------------------------------------
def test_svg_parses_with_one_rect_per_leaf_shown(samples_dir: Path) -> None:
    inv = inspect(str(samples_dir / "llama.pt"), [])
    svg = list_svg(inv)
    doc = ET.fromstring(svg)
    assert doc.tag == f"{SVG_NS}svg"
    rects = doc.findall(f".//{SVG_NS}rect")
    root, _, _ = module_tree(inv.params)
    tm = layout(root, Rect(0.0, 0.0, 1200.0, 720.0))
    assert len(rects) == len(tm.leaves)
    assert all(r.find(f"{SVG_NS}title") is not None for r in rects)
    titles = {r.find(f"{SVG_NS}title").text.split("\n")[0] for r in rects}  # type: ignore[union-attr]
    assert "lm_head.weight" in titles
    texts = [t.text or "" for t in doc.iter(f"{SVG_NS}text")]
    assert "model" in " ".join(texts)


def test_svg_of_hostile_names_and_of_100k_tensors() -> None:
    evil = ["a\x00b.weight", "x</svg><script>alert(1)</script>.w", "\ud800.bias", "é.w"]
    svg = list_svg(Inventory("evil.pt", "pt", params_of([(n, 64) for n in evil])))
    doc = ET.fromstring(svg)
    assert not doc.findall(f".//{SVG_NS}script")
    svg.encode("ascii")
    params = moe_params()
    start = time.perf_counter()
    svg = list_svg(Inventory("big.safetensors", "safetensors", params))
    elapsed = time.perf_counter() - start
    print(f"\n100k-tensor SVG: {elapsed:.2f} s, {len(svg) / 1e3:.0f} kB")
    doc = ET.fromstring(svg)
    assert len(doc.findall(f".//{SVG_NS}rect")) <= BUDGET
    assert "98,304 tensors in 64 blocks are shown aggregated" in svg


# -- the CLI -----------------------------------------------------------------------------------
def test_cli_list_html_and_svg(capsys: pytest.CaptureFixture[str], samples_dir: Path) -> None:
    src = samples_dir / "transformer.pt"
    res = run_inproc(capsys, "list", src, "-f", "html")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("<!DOCTYPE html>") and res.stdout.rstrip().endswith("</html>")
    res = run_inproc(capsys, "list", src, "blocks.1", "-f", "svg")
    assert res.returncode == 0, res.stderr
    ET.fromstring(res.stdout)
    assert "blocks.0" not in res.stdout
    res = run_inproc(capsys, "list", src, "--tree", "-f", "html")
    assert res.returncode == 2
    assert res.stderr == "error: -f html always draws the module tree; drop --tree\n"
    res = run_inproc(capsys, "list", src, "-f", "png")
    assert res.returncode == 2
    assert "html, svg" in res.stderr


def test_page_embeds_names_inertly() -> None:
    name = "x</script><img src=x onerror=alert(1)><!--.weight"
    page = list_html(Inventory("e.pt", "pt", params_of([(name, 64)])))
    body = page.split('<script type="application/json" id="data">', 1)[1].split("</script>")[0]
    assert "<" not in body and ">" not in body
    assert json.loads(body)["labels"]
    assert page.count("</script>") == 2 and "<img" not in page and "<!--" not in page


# -- the browser -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module, offline, logging console and network."""
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is not installed (CI installs Debian's chromium)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="paramctl-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.get("about:blank")
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def load(driver: Any, page: Path) -> float:
    """Open ``page``; returns the seconds until its script has drawn everything."""
    driver.get_log("browser")
    driver.get_log("performance")
    start = time.perf_counter()
    driver.get(page.as_uri())
    for _ in range(600):
        if driver.execute_script("return document.body && document.body.dataset.ready"):
            break
        time.sleep(0.05)
    elapsed = time.perf_counter() - start
    assert driver.execute_script("return document.body.dataset.ready") == "1", console(driver)
    return elapsed


def console(driver: Any) -> list[dict[str, Any]]:
    return list(driver.get_log("browser"))


def requests(driver: Any, page: Path) -> list[str]:
    """Every URL the page asked for beyond itself (performance log and resource timing),
    and any request to the network at all while it was open."""
    urls = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            url = msg["params"]["request"]["url"]
            ours = msg["params"].get("documentURL") == page.as_uri()
            if ((ours and url != page.as_uri() and not url.startswith("data:"))
                    or url.split(":")[0] in ("http", "https", "ws", "wss", "ftp")):
                urls.append(url)
    urls += driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    return urls


def assert_clean(driver: Any, page: Path) -> None:
    logs = console(driver)
    assert [e for e in logs if e["level"] in ("SEVERE", "WARNING")] == [], logs
    assert requests(driver, page) == []


def tiles(driver: Any, depth: int | None = None) -> list[dict[str, Any]]:
    return list(driver.execute_script("""
        const depth = arguments[0];
        return [...document.querySelectorAll('#map .tile')]
          .filter(el => depth === null || el.dataset.depth === String(depth))
          .map(el => { const r = el.getBoundingClientRect();
            const lab = el.querySelector('.lab');
            return {name: el.dataset.name, kind: el.dataset.kind, depth: +el.dataset.depth,
                    i: +el.dataset.i, label: lab ? lab.textContent : null, frame:
                    el.classList.contains('frame'), x: r.left, y: r.top, w: r.width,
                    h: r.height}; });""", depth))


def map_rect(driver: Any) -> dict[str, float]:
    return dict(driver.execute_script(
        "const r = document.getElementById('map').getBoundingClientRect();"
        "return {x: r.left, y: r.top, w: r.width, h: r.height};"))


def table_rows(driver: Any) -> list[list[str]]:
    return list(driver.execute_script(
        "return [...document.querySelectorAll('#tensors tbody tr')]"
        ".map(tr => [...tr.cells].map(td => td.textContent));"))


def shot(driver: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    print(f"\nscreenshot: {path}")
    return path


@pytest.fixture(scope="module")
def frozen_sample(samples_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Inventory:
    """The transformer sample with blocks.0 frozen (partial / frozen / trainable, a tie)."""
    from paramctl.cli import main

    path = tmp_path_factory.mktemp("picture") / "transformer.pt"
    shutil.copyfile(samples_dir / "transformer.pt", path)
    with pytest.raises(SystemExit) as done:
        main(["freeze", str(path), "blocks.0.*", "-q"])
    assert done.value.code in (0, None)
    return inspect(str(path), [])


@pytest.fixture(scope="module")
def sample_page(frozen_sample: Inventory, tmp_path_factory: pytest.TempPathFactory) -> Path:
    page = tmp_path_factory.mktemp("pages") / "transformer.html"
    page.write_text(list_html(frozen_sample), encoding="utf-8")
    return page


def top_level_shares(params: list[ParamInfo]) -> dict[str, float]:
    """Top-level name -> its share of the bytes, each tied group counted at its first name
    (computed here from the listing, not by the code under test)."""
    seen: set[str] = set()
    by_top: dict[str, int] = {}
    for p in params:
        counted = not (p.tied and any(t in seen for t in p.tied))
        seen.add(p.name)
        if counted:
            top = p.name.split(".")[0]
            by_top[top] = by_top.get(top, 0) + p.nbytes
    total = sum(by_top.values())
    return {k: v / total for k, v in by_top.items()}


def test_page_loads_offline_with_top_level_modules_sized_by_bytes(
        browser: Any, sample_page: Path, frozen_sample: Inventory, tmp_path: Path) -> None:
    seconds = load(browser, sample_page)
    print(f"\nloaded {sample_page} in {seconds:.2f} s")
    assert_clean(browser, sample_page)
    box = map_rect(browser)
    top = tiles(browser, 1)
    shares = top_level_shares(frozen_sample.params)
    assert {"embed", "blocks", "norm", "lm_head"} <= shares.keys() | {"lm_head"}
    for module, share in shares.items():
        if share == 0:
            continue
        found = [t for t in top if t["name"] == module or t["name"].startswith(module + ".")]
        assert len(found) == 1, (module, top)
        tile = found[0]
        assert tile["label"] and tile["label"].startswith(module), tile  # labelled
        measured = tile["w"] * tile["h"] / (box["w"] * box["h"])
        assert measured == pytest.approx(share, rel=0.05, abs=0.002), (module, measured, share)
    # lm_head.weight is tied to embed.weight: drawn once, and the page says where.
    note = browser.find_element("id", "note").text
    assert "lm_head.weight" in note
    legend = browser.find_element("id", "legend").text
    assert "36 tensors" in legend and "frozen 12,704 (46.2%)" in legend
    shot(browser, tmp_path, "transformer.png")


def test_page_layout_matches_the_python_layout(browser: Any, sample_page: Path,
                                               frozen_sample: Inventory) -> None:
    """picture.js lays out as treemap.py does: same tiles, same rectangles (to the pixel
    the page rounds to)."""
    load(browser, sample_page)
    box = map_rect(browser)
    root, _, _ = module_tree(frozen_sample.params)
    expected = layout(root, Rect(0.0, 0.0, box["w"], box["h"])).tiles
    drawn = sorted(tiles(browser), key=lambda t: t["i"])
    assert len(drawn) == len(expected)
    for got, want in zip(drawn, expected, strict=True):
        assert (got["name"], got["kind"], got["depth"], not got["frame"]) == (
            want.node.name, want.node.kind, want.depth, want.leaf)
        r = want.rect
        assert got["x"] - box["x"] == pytest.approx(r.x, abs=1.01)
        assert got["y"] - box["y"] == pytest.approx(r.y, abs=1.01)
        assert got["w"] == pytest.approx(r.w, abs=1.01)
        assert got["h"] == pytest.approx(r.h, abs=1.01)


def test_hover_shows_name_and_bytes(browser: Any, sample_page: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    load(browser, sample_page)
    el = browser.find_element("css selector", '#map .tile[data-name="embed.weight"]')
    ActionChains(browser).move_to_element(el).perform()
    tip = browser.find_element("id", "tip")
    assert tip.is_displayed()
    assert tip.text.splitlines()[0] == "embed.weight"
    assert "8.00 KiB" in tip.text and "2,048 params" in tip.text
    assert "tied with lm_head.weight" in tip.text
    frame = browser.find_element("css selector", '#map .tile.frame[data-name="blocks"] .lab')
    ActionChains(browser).move_to_element(frame).perform()
    assert tip.text.splitlines()[0] == "blocks"
    assert "99.25 KiB" in tip.text and "state: partial" in tip.text
    shot(browser, tmp_path, "hover.png")
    ActionChains(browser).move_to_element(browser.find_element("id", "legend")).perform()
    assert not tip.is_displayed()
    assert_clean(browser, sample_page)


def test_filter_narrows_and_headers_sort(browser: Any, sample_page: Path) -> None:
    load(browser, sample_page)
    assert len(table_rows(browser)) == 36
    box = browser.find_element("id", "filter")
    box.send_keys("attn.q_proj")
    time.sleep(0.3)
    names = [r[0] for r in table_rows(browser)]
    assert names == ["blocks.0.attn.q_proj.weight", "blocks.0.attn.q_proj.bias",
                     "blocks.1.attn.q_proj.weight", "blocks.1.attn.q_proj.bias"]
    assert browser.find_element("id", "count").text == "4 of 36 tensors"
    box.clear()
    box.send_keys("blocks.*.bias")  # a glob: * crosses dots, as on the command line
    time.sleep(0.3)
    assert len(table_rows(browser)) == 16
    box.clear()
    box.send_keys("blocks.1")  # a substring
    time.sleep(0.3)
    assert len(table_rows(browser)) == 16
    box.clear()
    box.send_keys("re:^norm\\.")
    time.sleep(0.3)
    assert [r[0] for r in table_rows(browser)] == ["norm.weight", "norm.bias"]
    box.clear()
    box.send_keys(" ")  # nothing but blanks: everything
    time.sleep(0.3)
    assert len(table_rows(browser)) == 36
    header = browser.find_element("xpath", "//th[text()='bytes']")
    header.click()
    rows = table_rows(browser)
    assert header.get_attribute("aria-sort") == "descending"
    assert rows[0][4] == "16.00 KiB" and rows[-1][4] == "128 B"
    header.click()
    rows = table_rows(browser)
    assert header.get_attribute("aria-sort") == "ascending"
    assert rows[0][4] == "128 B" and rows[-1][4] == "16.00 KiB"
    browser.find_element("xpath", "//th[text()='name']").click()
    names = [r[0] for r in table_rows(browser)]
    assert names == sorted(names)
    browser.find_element("xpath", "//th[text()='trainable']").click()
    assert [r[5] for r in table_rows(browser)] == ["no"] * 16 + ["yes"] * 20
    assert_clean(browser, sample_page)


def test_click_zooms_into_a_module_and_back(browser: Any, sample_page: Path,
                                            tmp_path: Path) -> None:
    from selenium.webdriver.common.keys import Keys

    load(browser, sample_page)
    browser.find_element("css selector", '#map .tile.frame[data-name="blocks"] .lab').click()
    crumbs = browser.find_element("id", "crumbs").text
    assert crumbs.startswith("all › blocks")
    top = tiles(browser, 1)
    assert sorted(t["name"] for t in top) == ["blocks.0", "blocks.1"]
    box = map_rect(browser)
    assert sum(t["w"] * t["h"] for t in top) == pytest.approx(box["w"] * box["h"], rel=0.01)
    assert browser.find_element("id", "count").text == "32 of 32 tensors under blocks"
    shot(browser, tmp_path, "zoomed.png")
    # A tensor's tile zooms into its module.
    browser.find_element("css selector", '#map .tile[data-name="blocks.1.mlp.fc1.weight"]'
                         ).click()
    assert browser.find_element("id", "crumbs").text.startswith("all › blocks › 1 › mlp › fc1")
    browser.find_element("tag name", "body").send_keys(Keys.ESCAPE)
    assert browser.find_element("id", "crumbs").text.startswith("all › blocks › 1 › mlp ")
    browser.find_element("xpath", "//nav[@id='crumbs']/button[text()='all']").click()
    assert browser.find_element("id", "crumbs").text.startswith("all ")
    assert len(table_rows(browser)) == 36
    assert_clean(browser, sample_page)


def test_hostile_names_are_shown_as_text(browser: Any, tmp_path: Path) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    evil = "</script><img src=x onerror=alert(1)>"
    names = [f"{evil}.weight", "<!--.bias", "a.<b>bold</b>.w", "ok.weight"]
    page = tmp_path / "evil.html"
    page.write_text(list_html(Inventory(evil, "pt", params_of([(n, 4096) for n in names]))),
                    encoding="utf-8")
    load(browser, page)
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert  # noqa: B018
    counts = browser.execute_script(
        "return ['img', 'b', 'script'].map(t => document.getElementsByTagName(t).length)")
    assert counts == [0, 0, 2]
    assert [r[0] for r in table_rows(browser)] == names
    assert browser.find_element("id", "source").text.startswith(evil)
    labels = {t["name"]: t["label"] for t in tiles(browser)}
    assert labels[f"{evil}.weight"] == f"{evil}.weight"
    assert_clean(browser, page)


def test_100k_tensor_page_generates_loads_and_stays_usable(
        browser: Any, tmp_path: Path, record_property: Callable[[str, object], None]) -> None:
    from selenium.webdriver.common.keys import Keys

    params = moe_params()
    assert len(params) == 98304
    start, cpu = time.perf_counter(), time.process_time()
    page_text = list_html(Inventory("moe.safetensors", "safetensors", params))
    generate, generate_cpu = time.perf_counter() - start, time.process_time() - cpu
    page = tmp_path / "moe.html"
    page.write_text(page_text, encoding="utf-8")
    size = page.stat().st_size
    seconds = load(browser, page)
    figures = {"tensors": len(params), "generate_s": round(generate, 2),
               "generate_cpu_s": round(generate_cpu, 2), "page_mb": round(size / 1e6, 2),
               "chromium_load_s": round(seconds, 2)}
    print(f"\n100k-tensor page: {figures}")
    (tmp_path / "figures.json").write_text(json.dumps(figures))
    for key, value in figures.items():
        record_property(key, value)
    assert generate < 30
    assert size < 5e6
    assert_clean(browser, page)
    drawn = tiles(browser)
    assert len(drawn) <= BUDGET
    box = map_rect(browser)
    expected = layout(module_tree(params)[0], Rect(0.0, 0.0, box["w"], box["h"])).tiles
    assert [(t["name"], t["depth"]) for t in sorted(drawn, key=lambda t: t["i"])] == [
        (t.node.name, t.depth) for t in expected]  # the same layout as treemap.py's
    note = browser.find_element("id", "note").text
    assert "98,304 tensors in 64 hatched blocks are shown aggregated" in note
    assert browser.find_element("id", "count").text.startswith(
        "showing 2,000 of 98,304 matching tensors")
    assert len(table_rows(browser)) == 2000
    shot(browser, tmp_path, "moe.png")
    # Zooming into a layer lays it out at full size: its experts become visible.
    layer = browser.find_element(
        "css selector", '#map .tile[data-name="model.layers.3.mlp.experts"]')
    assert layer.text.startswith("3.mlp.experts")  # model.layers > 3 > mlp > experts, folded
    layer.click()
    inner = tiles(browser, 1)
    assert len(inner) > 100
    assert browser.find_element("id", "count").text == (
        "1,536 of 1,536 tensors under model.layers.3.mlp.experts")
    shot(browser, tmp_path, "moe-layer3.png")
    browser.find_element("tag name", "body").send_keys(Keys.ESCAPE)
    box = browser.find_element("id", "filter")
    box.send_keys("layers.5.mlp.experts.17.")
    time.sleep(0.6)
    assert len(table_rows(browser)) == 3
    box.clear()
    box.send_keys("model.layers.6.mlp.experts.1?")  # a glob naming 10 modules
    time.sleep(0.6)
    assert len(table_rows(browser)) == 30
    start = time.perf_counter()
    browser.find_element("xpath", "//th[text()='name']").click()
    print(f"sorting 98,304 names: {time.perf_counter() - start:.2f} s")
    assert_clean(browser, page)


def diff_rows() -> list[dict[str, Any]]:
    def row(name: str, status: str, shape_a: list[int] | None, shape_b: list[int] | None,
            dtype_a: str | None = "float32", dtype_b: str | None = "float32",
            rel: float | None = None, grad: tuple[bool | None, bool | None] = (True, True),
            ) -> dict[str, Any]:
        metrics = status in ("changed", "dtype")
        return {"name": name, "status": status, "shape_a": shape_a, "shape_b": shape_b,
                "dtype_a": dtype_a if shape_a else None, "dtype_b": dtype_b if shape_b else None,
                "requires_grad_a": grad[0] if shape_a else None,
                "requires_grad_b": grad[1] if shape_b else None,
                "max_abs": rel * 3 if metrics and rel is not None else None,
                "rel_l2": rel if metrics else None,
                "cosine": 1 - (rel or 0) if metrics else None}

    return [
        row("enc.0.w", "same", [64, 64], [64, 64]),
        row("enc.1.w", "changed", [64, 64], [64, 64], rel=1e-7),
        row("enc.2.w", "changed", [64, 64], [64, 64], rel=0.5),
        row("enc.3.w", "same", [64, 64], [64, 64], grad=(True, False)),
        row("dec.w", "shape", [32, 32], [64, 32]),
        row("dec.b", "dtype", [32], [32], "float32", "bfloat16", rel=1e-3),
        row("head.w", "added", None, [64, 64]),
        row("old.w", "removed", [16, 64], None),
        row("zero.w", "changed", [8], [8], rel=None),
    ]


def test_diff_page(browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    rows = diff_rows()
    page = tmp_path / "diff.html"
    page.write_text(diff_html(rows, "a.pt", "b.safetensors"), encoding="utf-8")
    load(browser, page)
    assert_clean(browser, page)
    colour = {t["name"]: browser.execute_script(
        "return getComputedStyle(arguments[0]).backgroundColor",
        browser.find_element("css selector", f'#map .tile[data-name="{t["name"]}"]'))
        for t in tiles(browser) if not t["frame"]}
    assert colour["enc.0.w"] == "rgb(227, 227, 227)"  # same: grey
    faint, strong = (sum(map(int, colour[n][4:-1].split(","))) for n in ("enc.1.w", "enc.2.w"))
    assert strong < faint  # a larger rel_l2 is darker on the ramp
    assert len({colour["enc.1.w"], colour["dec.w"], colour["head.w"], colour["old.w"]}) == 4
    # Area ∝ the larger side's bytes: dec.w is 64x32 float32 in B.
    shares = {"enc": 4 * 64 * 64 * 4, "dec": 64 * 32 * 4 + 32 * 4, "head.w": 64 * 64 * 4,
              "old.w": 16 * 64 * 4, "zero.w": 32}
    total = sum(shares.values())
    box = map_rect(browser)
    for tile in tiles(browser, 1):
        assert tile["w"] * tile["h"] / (box["w"] * box["h"]) == pytest.approx(
            shares[tile["name"]] / total, rel=0.05, abs=0.002)
    flagged = browser.find_elements("css selector", "#map .tile.flag")
    assert [el.get_attribute("data-name") for el in flagged] == ["enc.3.w"]
    ActionChains(browser).move_to_element(
        browser.find_element("css selector", '#map .tile[data-name="enc.2.w"]')).perform()
    tip = browser.find_element("id", "tip").text
    assert "status: changed" in tip and "rel_l2 0.5" in tip and "16.00 KiB" in tip
    table = {r[0]: r for r in table_rows(browser)}
    assert table["dec.w"][2] == "32x32 → 64x32"
    assert table["dec.b"][3] == "float32 → bfloat16"
    assert table["enc.3.w"][8] == "true → false"
    assert table["head.w"][1] == "added"
    browser.find_element("xpath", "//th[text()='rel_l2']").click()
    assert [r[0] for r in table_rows(browser)][:3] == ["enc.2.w", "dec.b", "enc.1.w"]
    legend = browser.find_element("id", "legend").text
    assert "9 names" in legend and "3 changed" in legend
    shot(browser, tmp_path, "diff.png")
    assert_clean(browser, page)


def test_empty_listing_page(browser: Any, tmp_path: Path) -> None:
    page = tmp_path / "empty.html"
    page.write_text(list_html(Inventory("none.pt", "pt", [])), encoding="utf-8")
    load(browser, page)
    assert tiles(browser) == []
    assert_clean(browser, page)
