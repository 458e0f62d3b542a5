"""Squarified treemaps (Bruls, Huizing and van Wijk, 2000) of the module hierarchy.

Three pure steps, no I/O:

- :func:`squarify` tiles one rectangle with rectangles whose areas are proportional to
  weights, keeping them close to square;
- :func:`build_tree` / :func:`module_tree` roll dotted names up into modules (the dotted
  prefixes ``--tree`` uses), each node carrying bytes, numel, tensor count and state;
- :func:`layout` nests the two: children inside their module, below a label strip, with
  modules and tensors too small to see (or past a budget of rectangles) merged into one
  "(N smaller)" block per parent.

The HTML page runs the same algorithm in JavaScript (``picture.js``) so that it can lay
out again when zooming; keep the two in step (``tests/test_pictures.py`` compares them).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from paramctl.model import ParamInfo, counted_once
from paramctl.render.common import grad_bits

__all__ = [
    "BUDGET", "HEADER", "MIN_AREA", "PAD", "STATES", "Node", "Rect", "Tile", "Treemap",
    "build_tree", "inner_rect", "layout", "module_tree", "squarify",
]

MIN_AREA = 16.0  # px²: a rectangle smaller than 4x4 px is merged into its parent's block
BUDGET = 5000  # rectangles drawn at most per view
HEADER = 16.0  # px: the label strip of an expanded module
PAD = 2.0  # px: gap between a module's edge and its children

# grad_bits OR-ed over a node, as the page names it.
STATES = ("none", "trainable", "frozen", "partial")


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    w: float
    h: float

    @property
    def area(self) -> float:
        return self.w * self.h


def _worst(total: float, smallest: float, largest: float, side: float) -> float:
    """The worst aspect ratio of a row of rectangles of these areas along ``side``."""
    s2, q = total * total, side * side
    return max(q * largest / s2, s2 / (q * smallest))


def squarify(weights: Sequence[float], rect: Rect) -> list[Rect]:
    """Tile ``rect`` with one rectangle per weight, area proportional to weight.

    Rectangles come back in the order of ``weights``; they are placed largest first in
    rows along the shorter side, a row growing while that improves its worst aspect ratio.
    A weight of zero (or less) gets an empty rectangle at the corner.

    >>> [(r.x, r.y, r.w, r.h) for r in squarify([3, 1], Rect(0.0, 0.0, 4.0, 2.0))]
    [(0.0, 0.0, 3.0, 2.0), (3.0, 0.0, 1.0, 2.0)]
    """
    out = [Rect(rect.x, rect.y, 0.0, 0.0)] * len(weights)
    order = sorted((i for i, w in enumerate(weights) if w > 0), key=lambda i: -weights[i])
    total = 0.0
    for i in order:
        total += weights[i]
    if not order or rect.w <= 0 or rect.h <= 0:
        return out
    scale = rect.w * rect.h / total
    areas = [weights[i] * scale for i in order]
    x, y, w, h = rect.x, rect.y, rect.w, rect.h
    n = len(areas)
    i = 0
    while i < n:
        side = min(w, h)
        s = lo = hi = areas[i]
        worst = _worst(s, lo, hi, side)
        j = i + 1
        while j < n:
            a = areas[j]
            cand = _worst(s + a, min(lo, a), max(hi, a), side)
            if cand > worst:
                break
            s, lo, hi, worst = s + a, min(lo, a), max(hi, a), cand
            j += 1
        last = j == n  # the last row takes exactly what is left (no float drift)
        if w >= h:  # a column at the left, as tall as the rectangle
            cw = w if last else s / h
            yy = y
            for k in range(i, j):
                rh = y + h - yy if k == j - 1 else areas[k] / cw
                out[order[k]] = Rect(x, yy, cw, rh)
                yy += rh
            x += cw
            w = max(w - cw, 0.0)
        else:  # a row at the top, as wide as the rectangle
            rh = h if last else s / w
            xx = x
            for k in range(i, j):
                rw = x + w - xx if k == j - 1 else areas[k] / rh
                out[order[k]] = Rect(xx, y, rw, rh)
                xx += rw
            y += rh
            h = max(h - rh, 0.0)
        i = j
    return out


@dataclass(eq=False, slots=True)
class Node:
    """A module, a tensor (``item`` is its index in the listing) or an aggregate block
    ("(N smaller)", ``children`` holding what it merges). Figures cover the subtree.

    ``label`` is the name relative to the parent node: one name part, or several joined by
    dots where a chain of single-child modules was folded into one node.
    """

    name: str  # full dotted name; an aggregate block carries its parent's
    label: str
    kind: str = "module"  # module / tensor / more
    parent: Node | None = None
    item: int | None = None
    children: list[Node] = field(default_factory=list)
    weight: float = 0.0  # bytes, a tied group counted once
    numel: int = 0
    tensors: int = 0
    bits: int = 0  # grad_bits OR-ed: STATES[bits]

    @property
    def state(self) -> str:
        return STATES[self.bits]

    def items(self) -> list[int]:
        """The listing indices of every tensor below this node."""
        out: list[int] = []
        todo = [self]
        while todo:
            node = todo.pop()
            if node.item is not None:
                out.append(node.item)
            todo.extend(node.children)
        return out


def _structure(names: Sequence[str]) -> tuple[Node, list[Node], list[Node]]:
    root = Node("", "")
    modules: list[Node] = []
    index: dict[str, Node] = {}
    leaves: list[Node] = []
    for i, name in enumerate(names):
        path, dot, label = name.rpartition(".")
        parent = root
        if dot:
            found = index.get(path)
            if found is None:  # create the missing modules on the path, outermost first
                missing = []
                head = path
                while found is None:
                    missing.append(head)
                    head, dot, _ = head.rpartition(".")
                    found = index.get(head) if dot else root
                for key in reversed(missing):
                    node = Node(key, key.rpartition(".")[2], parent=found)
                    index[key] = node
                    modules.append(node)
                    found.children.append(node)
                    found = node
            parent = found
        leaf = Node(name, label, kind="tensor", parent=parent, item=i, tensors=1)
        parent.children.append(leaf)
        leaves.append(leaf)
    return root, modules, leaves


def _add_to(target: Node, node: Node) -> None:
    target.weight += node.weight
    target.numel += node.numel
    target.tensors += node.tensors
    target.bits |= node.bits


def _finish(root: Node, modules: list[Node], leaves: list[Node]) -> list[Node]:
    """Sum figures up the tree, then fold every module that has a single child into that
    child (``model`` > ``layers`` becomes ``model.layers``; ``embed`` > ``weight`` becomes
    the tensor ``embed.weight``): a frame around one thing shows nothing but its label.
    Returns the modules left."""
    for node in (*leaves, *reversed(modules)):  # a module after all its children
        if node.parent is not None:
            _add_to(node.parent, node)
    folded: set[int] = set()
    for node in (*reversed(modules), root):  # chains fold bottom-up
        for i, child in enumerate(node.children):
            if child.kind == "module" and len(child.children) == 1:
                only = child.children[0]
                only.label = f"{child.label}.{only.label}"
                only.parent = node
                node.children[i] = only
                folded.add(id(child))
    return [m for m in modules if id(m) not in folded]


def build_tree(names: Sequence[str], weights: Sequence[float]) -> tuple[Node, list[Node],
                                                                      list[Node]]:
    """Roll names up by their dotted prefixes: ``(root, modules, leaves)``.

    ``modules`` are in creation order (a parent before its children), ``leaves[i]`` is
    ``names[i]``. Children keep the order in which they first appear, as ``--tree`` does.
    A module's weight is the sum of its leaves'; single-child modules are folded into
    their child.

    >>> root, modules, _ = build_tree(["a.x", "a.b.y", "a.b.z", "c.w"], [1, 2, 3, 4])
    >>> [(n.label, n.weight) for n in root.children]
    [('a', 6.0), ('c.w', 4.0)]
    >>> [(n.label, n.name) for n in modules]
    [('a', 'a'), ('b', 'a.b')]
    """
    root, modules, leaves = _structure(names)
    for leaf, weight in zip(leaves, weights, strict=True):
        leaf.weight = float(weight)
    return root, _finish(root, modules, leaves), leaves


def module_tree(params: Sequence[ParamInfo]) -> tuple[Node, list[Node], list[Node]]:
    """:func:`build_tree` of a listing weighted by bytes, with numel, tensor count and
    state. A tied group counts at its first listed name (as ``totals`` counts it); its
    other names weigh nothing but still count as tensors and in the state."""
    root, modules, leaves = _structure([p.name for p in params])
    for leaf, p, counts in zip(leaves, params, counted_once(params), strict=True):
        leaf.bits = grad_bits(p)
        if counts:
            leaf.weight = float(p.nbytes)
            leaf.numel = p.numel
    return root, _finish(root, modules, leaves), leaves


@dataclass(eq=False)
class Tile:
    """One drawn rectangle. An expanded module (``leaf`` false) shows its children inside,
    below a label strip ``header`` px tall (0 when too small for one)."""

    node: Node
    rect: Rect
    depth: int
    leaf: bool = True
    header: float = 0.0


@dataclass
class Treemap:
    tiles: list[Tile]  # parents before children
    aggregated_tensors: int  # tensors without a rectangle of their own
    aggregated_blocks: int  # the rectangles that stand for them

    @property
    def leaves(self) -> list[Tile]:
        return [t for t in self.tiles if t.leaf]


def inner_rect(rect: Rect) -> tuple[Rect, float] | None:
    """Where a module's children go, below its label strip, and the strip's height; None
    when the module is too small for a label and children (it is then drawn whole, with
    its label)."""
    if rect.w < 2 * HEADER or rect.h < 2 * HEADER:
        return None
    return Rect(rect.x + PAD, rect.y + HEADER, rect.w - 2 * PAD, rect.h - HEADER - PAD), HEADER


def _merge(parent: Node, rest: list[Node]) -> Node:
    block = Node(parent.name, f"({len(rest)} smaller)", kind="more", parent=parent,
                 children=rest)
    for node in rest:
        _add_to(block, node)
    return block


def layout(root: Node, rect: Rect, *, min_area: float = MIN_AREA,
           budget: int = BUDGET) -> Treemap:
    """Lay ``root``'s subtree out in ``rect``: its children fill the rectangle, then the
    drawn modules are expanded in turn, largest first, while the budget of rectangles
    lasts.

    A child whose rectangle would be smaller than ``min_area`` px², or than an even share
    of the budget (``rect.area / budget``), is merged with its small siblings into one
    "(N smaller)" block; so are children past the budget. A module none of whose children
    would be visible stays one block. When nothing under ``root`` itself is large enough
    (zooming into a block of many equal tensors), the blocks are split into groups that
    are. Children with no weight (tied duplicates, empty tensors) are not drawn.
    """
    floor = max(min_area, rect.area / budget)
    tiles: list[Tile] = []
    heap: list[tuple[float, int, Tile]] = []

    def expand(node: Node, area: Rect, depth: int, force: bool) -> bool:
        kids = sorted((c for c in node.children if c.weight > 0), key=lambda c: -c.weight)
        if not kids:
            return False
        total = 0.0
        for c in kids:
            total += c.weight
        room = budget - len(tiles)
        shown = 0
        while (shown < len(kids) and shown < room
               and kids[shown].weight / total * area.area >= floor):
            shown += 1
        if shown < len(kids):
            if len(kids) - shown == 1 and shown + 1 <= room:
                shown += 1  # one small child is drawn as itself, not as "(1 smaller)"
            else:
                shown = max(min(shown, room - 1), 0)
        if shown == 0 and not force:
            return False
        drawn = kids[:shown]
        rest = kids[shown:]
        if rest:
            groups = 1
            if shown == 0 and len(rest) > 1:
                groups = max(1, min(len(rest), math.floor(area.area / floor), room))
            size = math.ceil(len(rest) / groups)
            drawn.extend(_merge(node, rest[i:i + size]) for i in range(0, len(rest), size))
        for child, r in zip(drawn, squarify([c.weight for c in drawn], area), strict=True):
            tile = Tile(child, r, depth + 1)
            tiles.append(tile)
            if child.kind == "module":
                heapq.heappush(heap, (-r.area, len(tiles), tile))
        return True

    expand(root, rect, 0, True)
    while heap:
        _, _, tile = heapq.heappop(heap)
        spot = inner_rect(tile.rect)
        if spot is not None and expand(tile.node, spot[0], tile.depth, False):
            tile.leaf = False
            tile.header = spot[1]
    blocks = [t for t in tiles if t.leaf and t.node.kind != "tensor"]
    return Treemap(tiles, sum(t.node.tensors for t in blocks), len(blocks))
