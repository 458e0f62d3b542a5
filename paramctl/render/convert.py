"""What ``convert`` did (or would do): old -> new names, dtypes and bytes. Plain text, no
rich: the table is aligned columns, so a dry run of 100,000 names stays fast."""

from __future__ import annotations

import json
from typing import Any, TextIO

from paramctl.render.common import human_bytes

__all__ = ["CONVERT_FORMATS", "render_convert"]

CONVERT_FORMATS = ("table", "tsv", "json")


def render_convert(result: Any, fmt: str, out: TextIO, *, dry_run: bool,
                   headers: bool = True) -> None:
    """``result``: a :class:`paramctl.surgery.ConvertResult`."""
    rows = result.rows
    if fmt == "json":
        doc = {"source": result.source, "format": result.format, "dry_run": dry_run,
               "written": str(result.written) if result.written else None,
               "tensors": [{"name": r.name, "new_name": r.new_name, "status": r.status,
                            "shape": list(r.shape), "dtype": r.dtype,
                            "new_dtype": r.new_dtype if r.new_name is not None else None,
                            "bytes": r.nbytes,
                            "new_bytes": r.new_nbytes if r.new_name is not None else None}
                           for r in rows],
               "totals": {"tensors": len(rows),
                          "kept": sum(r.new_name is not None for r in rows),
                          "dropped": sum(r.new_name is None for r in rows),
                          "renamed": sum(r.new_name not in (None, r.name) for r in rows),
                          "cast": sum(r.new_name is not None and r.new_dtype != r.dtype
                                      for r in rows),
                          "bytes_before": result.bytes_before,
                          "bytes_after": result.bytes_after}}
        out.write(json.dumps(doc, indent=2) + "\n")
        return
    if fmt == "tsv":
        if headers:
            out.write("name\tnew_name\tstatus\tdtype\tnew_dtype\tbytes\tnew_bytes\n")
        for r in rows:
            out.write(f"{r.name}\t{r.new_name or ''}\t{r.status}\t{r.dtype}\t"
                      f"{r.new_dtype if r.new_name else ''}\t{r.nbytes}\t"
                      f"{r.new_nbytes if r.new_name else 0}\n")
        return
    changed = [r for r in rows if r.status != "kept"]
    if changed and headers:
        width = min(60, max(len(r.name) for r in changed))
        out.write(f"{'name':<{width}}  {'becomes':<{width}}  dtype\n")
    for r in changed:
        new = r.new_name if r.new_name is not None else "(dropped)"
        dtype = r.dtype if r.new_dtype == r.dtype or r.new_name is None else \
            f"{r.dtype} -> {r.new_dtype}"
        width = min(60, max(len(x.name) for x in changed))
        out.write(f"{r.name:<{width}}  {new:<{width}}  {dtype}\n")
    kept = sum(r.new_name is not None for r in rows)
    verb = "would write" if dry_run else "wrote"
    out.write(f"{verb} {kept} of {len(rows)} tensors, {human_bytes(result.bytes_before)} -> "
              f"{human_bytes(result.bytes_after)}"
              + ("; nothing written (dry run)" if dry_run else "") + "\n")
