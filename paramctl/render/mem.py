"""Output of ``paramctl mem``: a plain aligned text table or the JSON document.

No rich: the table is a handful of aligned lines, so it costs no import.
"""

from __future__ import annotations

import json
from typing import TextIO

from paramctl.memory import MemEstimate
from paramctl.render.common import human_bytes

__all__ = ["MEM_FORMATS", "render_mem"]

MEM_FORMATS = ("table", "json")

ACTIVATIONS_NOTE = "activations are not included (they depend on batch size and sequence length)"


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "0.0%"


def mem_table(est: MemEstimate) -> str:
    """The human table: one row per component, a per-device column when sharded."""
    sharded = est.shards > 1
    setup = f"{est.optimizer}, {est.precision}"
    if sharded:
        setup += f", {est.shards} devices, ZeRO stage {est.zero}"
    elif est.zero:
        setup += f" (ZeRO stage {est.zero} has no effect on one device)"
    header = ["component", "total"] + (["per device"] if sharded else [])
    rows = [header]
    for label, field in (("weights", "weights"), ("gradients", "gradients"),
                         ("master copy", "master"), ("optimizer state", "optimizer"),
                         ("total", "total")):
        row = [label, human_bytes(getattr(est.bytes, field))]
        if sharded:
            row.append(human_bytes(getattr(est.per_device, field)))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [f"{est.source}: training with {setup}", ""]
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:],
                                                                       strict=True)]
        lines.append("  ".join(cells).rstrip())
    total = est.params_total
    lines += [
        "",
        f"params {total:,} · trainable {est.params_trainable:,} "
        f"({_pct(est.params_trainable, total)}) · frozen {est.params_frozen:,} "
        f"({_pct(est.params_frozen, total)})",
        ACTIVATIONS_NOTE,
    ]
    return "\n".join(lines) + "\n"


def render_mem(est: MemEstimate, kind: str, stream: TextIO) -> None:
    """Write ``est`` as ``kind`` (``table`` or ``json``) to ``stream``."""
    if kind == "json":
        stream.write(json.dumps(est.to_json(), indent=2) + "\n")
    else:
        stream.write(mem_table(est))
