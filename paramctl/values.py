"""``stats`` and ``diff``: the numbers inside checkpoints, read tensor by tensor.

Both stream each tensor's bytes in chunks (one tensor's chunk in memory at a time, never
a tensor or a model) through :mod:`paramctl.numeric`, which decodes every stored dtype and
reduces in float64. Byte-identical tensors are recognised by comparing bytes, without
decoding. Work splits over processes (``jobs``) and, under ``torchrun``, over ranks.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from paramctl.errors import CorruptFileError, UsageError
from paramctl.io.files import FdPool
from paramctl.model import ParamInfo, TensorRecord
from paramctl.patterns import select
from paramctl.sources.base import FileSource, OpenOptions
from paramctl.view import Prefixes, View, open_view

__all__ = ["DiffResult", "DiffRow", "StatsResult", "StatsRow", "diff", "stats"]

_PARALLEL_BYTES = 256 << 20  # below this, one process is faster than starting more


# -- stats ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class StatsRow:
    """One tensor's figures (DESIGN "stats"); ``note`` says why figures are missing."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    std: float | None = None
    l2: float | None = None
    zeros: int | None = None
    nan: int | None = None
    inf: int | None = None
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["shape"] = list(self.shape)
        if self.note is None:
            del doc["note"]
        return doc


@dataclass
class StatsResult:
    source: str
    format: str
    rows: list[StatsRow]

    @property
    def totals(self) -> dict[str, int]:
        return {
            "tensors": len(self.rows),
            "numel": sum(r.numel for r in self.rows),
            "nan": sum(r.nan or 0 for r in self.rows),
            "inf": sum(r.inf or 0 for r in self.rows),
            "nonfinite_tensors": sum(1 for r in self.rows if (r.nan or 0) + (r.inf or 0)),
        }

    @property
    def nonfinite(self) -> list[StatsRow]:
        return [r for r in self.rows if (r.nan or 0) + (r.inf or 0)]


def _refuse_remote(view: View) -> None:
    if getattr(view.source, "remote", False):
        raise UsageError("remote sources are read-only; download first (stats and diff read "
                         "tensor values; `diff --structure-only` and `list` read metadata)")
    if not hasattr(view.source, "records"):
        raise UsageError(f"{view.source.display}: a {view.source.format} source has no stored "
                         "tensor values to read")


def _records(view: View, pool: FdPool) -> list[TensorRecord]:
    source = cast("FileSource", view.source)
    return source.records(pool)


def _chunks(record: TensorRecord, chunk: int, display: str) -> Iterator[bytes | memoryview]:
    """The record's bytes in pieces of at most ``chunk`` (a multiple of the item size)."""
    if record.load is not None:
        view = memoryview(record.load())
        if len(view) != record.nbytes:
            raise CorruptFileError(f"{display}: {record.name!r}: expected {record.nbytes} "
                                   f"bytes, got {len(view)}")
        for start in range(0, len(view), chunk):
            yield view[start:start + chunk]
        return
    assert record.fd is not None
    pos, end = record.offset, record.offset + record.nbytes
    while pos < end:
        data = os.pread(record.fd, min(chunk, end - pos), pos)
        if not data:
            raise CorruptFileError(f"{display}: truncated data for {record.name!r}")
        yield data
        pos += len(data)


def _stats_row(record: TensorRecord, shown: str, display: str) -> StatsRow:
    from paramctl import numeric

    numel = 1
    for d in record.shape:
        numel *= d
    if record.dtype not in numeric.DECODABLE:
        return StatsRow(shown, record.shape, record.dtype, numel,
                        note=f"{record.dtype} values are not decoded")
    s = numeric.tensor_stats(_chunks(record, numeric.chunk_bytes(record.dtype), display),
                             record.dtype, numel)
    return StatsRow(shown, record.shape, record.dtype, numel, s.min, s.max, s.mean, s.std,
                    s.l2, s.zeros, s.nan, s.inf)


def _selected(view: View, patterns: Sequence[str], excludes: Sequence[str],
              allow_empty: bool) -> list[ParamInfo]:
    if not patterns and not excludes:
        return list(view.params)
    chosen = set(select(view.names, list(patterns) or ["*"], excludes,
                        allow_empty=allow_empty))
    return [p for p in view.params if p.name in chosen]


def _stats_of(spec: str, options: OpenOptions | None, prefix: Prefixes,
              names: Sequence[str]) -> list[StatsRow]:
    """Rows for ``names`` (shown names), in that order: one process's share."""
    view = open_view(spec, options, prefix=prefix)
    wanted = {view.stored[n]: n for n in names}
    rows: dict[str, StatsRow] = {}
    with FdPool() as pool:
        for record in _records(view, pool):
            if record.name in wanted:
                shown = wanted[record.name]
                rows[shown] = _stats_row(record, shown, view.source.display)
    return [rows[n] for n in names]


def stats(spec: str, patterns: Sequence[str] = (), *, excludes: Sequence[str] = (),
          options: OpenOptions | None = None, prefix: Prefixes = None,
          allow_empty: bool = False, jobs: int | None = None) -> StatsResult:
    """Per-tensor min, max, mean, std, l2, zeros, nan and inf of ``spec``'s tensors.

    >>> res = stats("model.safetensors", ["*.weight"])   # doctest: +SKIP
    >>> res.totals["nonfinite_tensors"]                  # doctest: +SKIP
    0
    """
    view = open_view(spec, options, prefix=prefix)
    _refuse_remote(view)
    params = _selected(view, patterns, excludes, allow_empty)
    names = [p.name for p in params]
    rows = _run_shares(_stats_of, spec, options, prefix, params, jobs)
    return StatsResult(view.source.display, view.source.format,
                       rows if rows is not None else _stats_of(spec, options, prefix, names))


# -- diff ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiffRow:
    """One name's comparison (DESIGN "diff"); fields that do not apply are None."""

    name: str
    status: str  # added removed shape dtype changed same present
    shape_a: tuple[int, ...] | None = None
    shape_b: tuple[int, ...] | None = None
    dtype_a: str | None = None
    dtype_b: str | None = None
    requires_grad_a: bool | None = None
    requires_grad_b: bool | None = None
    max_abs: float | None = None
    rel_l2: float | None = None
    cosine: float | None = None

    @property
    def flag_changed(self) -> bool:
        return (self.requires_grad_a is not None and self.requires_grad_b is not None
                and self.requires_grad_a != self.requires_grad_b)

    @property
    def differs(self) -> bool:
        return self.status not in ("same", "present") or self.flag_changed

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        for key in ("shape_a", "shape_b"):
            doc[key] = list(doc[key]) if doc[key] is not None else None
        return doc


@dataclass
class DiffResult:
    a: str
    b: str
    rows: list[DiffRow]
    structure_only: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def totals(self) -> dict[str, int]:
        out = {k: 0 for k in ("same", "changed", "added", "removed", "shape", "dtype")}
        if self.structure_only:
            out["present"] = 0
        for r in self.rows:
            out[r.status] = out.get(r.status, 0) + 1
        out["flags"] = sum(1 for r in self.rows if r.flag_changed)
        return out

    @property
    def differs(self) -> bool:
        return any(r.differs for r in self.rows)


def _equal_bytes(a: TensorRecord, b: TensorRecord, display_a: str, display_b: str) -> bool:
    chunk = 16 << 20
    return all(x == y for x, y in zip(_chunks(a, chunk, display_a), _chunks(b, chunk, display_b),
                                      strict=True))


def _compare(a: TensorRecord, b: TensorRecord, pa: ParamInfo, pb: ParamInfo,
             display_a: str, display_b: str) -> DiffRow:
    from paramctl import numeric

    base = DiffRow(pa.name, "same", pa.shape, pb.shape, pa.dtype, pb.dtype,
                   pa.requires_grad, pb.requires_grad)
    if pa.shape != pb.shape:
        return _replace(base, status="shape")
    if pa.dtype == pb.dtype and _equal_bytes(a, b, display_a, display_b):
        return base
    status = "changed" if pa.dtype == pb.dtype else "dtype"
    if pa.dtype not in numeric.DECODABLE or pb.dtype not in numeric.DECODABLE:
        return _replace(base, status=status)
    m = numeric.diff_metrics(_chunks(a, numeric.chunk_bytes(a.dtype), display_a), a.dtype,
                             _chunks(b, numeric.chunk_bytes(b.dtype), display_b), b.dtype,
                             pa.numel)
    return _replace(base, status=status, max_abs=m.max_abs, rel_l2=m.rel_l2, cosine=m.cosine)


def _replace(row: DiffRow, **changes: Any) -> DiffRow:
    from dataclasses import replace

    return replace(row, **changes)


def _diff_of(specs: tuple[str, str], options: tuple[OpenOptions | None, OpenOptions | None],
             prefix: Prefixes, names: Sequence[str]) -> list[DiffRow]:
    """Value comparison of ``names`` (present in both, same shape): one process's share."""
    va = open_view(specs[0], options[0], prefix=prefix)
    vb = open_view(specs[1], options[1], prefix=prefix)
    info_a = {p.name: p for p in va.params}
    info_b = {p.name: p for p in vb.params}
    with FdPool() as pool:
        rec_a = {r.name: r for r in _records(va, pool)}
        rec_b = {r.name: r for r in _records(vb, pool)}
        return [_compare(rec_a[va.stored[n]], rec_b[vb.stored[n]], info_a[n], info_b[n],
                         va.source.display, vb.source.display) for n in names]


def diff(a: str, b: str, patterns: Sequence[str] = (), *, excludes: Sequence[str] = (),
         structure_only: bool = False, options_a: OpenOptions | None = None,
         options_b: OpenOptions | None = None, prefix: Prefixes = None,
         allow_empty: bool = False, jobs: int | None = None) -> DiffResult:
    """Pair the tensors of ``a`` and ``b`` by name and say what changed.

    >>> res = diff("base.safetensors", "tuned.safetensors")   # doctest: +SKIP
    >>> res.totals["changed"]                                  # doctest: +SKIP
    12
    """
    va = open_view(a, options_a, prefix=prefix)
    vb = open_view(b, options_b, prefix=prefix)
    if not structure_only:
        _refuse_remote(va)
        _refuse_remote(vb)
    pa = {p.name: p for p in va.params}
    pb = {p.name: p for p in vb.params}
    union = list(pa) + [n for n in pb if n not in pa]
    if patterns or excludes:
        chosen = set(select(union, list(patterns) or ["*"], excludes, allow_empty=allow_empty))
        union = [n for n in union if n in chosen]
    rows: dict[str, DiffRow] = {}
    to_compare: list[str] = []
    for name in union:
        x, y = pa.get(name), pb.get(name)
        if x is None and y is not None:
            rows[name] = DiffRow(name, "added", None, y.shape, None, y.dtype, None,
                                 y.requires_grad)
        elif y is None and x is not None:
            rows[name] = DiffRow(name, "removed", x.shape, None, x.dtype, None,
                                 x.requires_grad, None)
        elif x is not None and y is not None:
            if x.shape != y.shape:
                status = "shape"
            elif structure_only:
                status = "present" if x.dtype == y.dtype else "dtype"
            else:
                to_compare.append(name)
                continue
            rows[name] = DiffRow(name, status, x.shape, y.shape, x.dtype, y.dtype,
                                 x.requires_grad, y.requires_grad)
    if to_compare:
        shares = _run_shares(_diff_of, (a, b), (options_a, options_b), prefix,
                             [pa[n] for n in to_compare], jobs)
        compared = shares if shares is not None else _diff_of(
            (a, b), (options_a, options_b), prefix, to_compare)
        rows.update({r.name: r for r in compared})
    return DiffResult(va.source.display, vb.source.display, [rows[n] for n in union],
                      structure_only)


# -- splitting the work --------------------------------------------------------------------
def _split(params: Sequence[ParamInfo], n: int) -> list[list[str]]:
    """``n`` shares of about equal bytes (largest first onto the lightest share)."""
    shares: list[list[str]] = [[] for _ in range(n)]
    load = [0] * n
    for p in sorted(params, key=lambda p: -p.nbytes):
        i = load.index(min(load))
        shares[i].append(p.name)
        load[i] += p.nbytes
    return shares


def _run_shares(worker: Callable[..., list[Any]], spec: Any, options: Any,
                prefix: Prefixes, params: Sequence[ParamInfo], jobs: int | None
                ) -> list[Any] | None:
    """Run ``worker`` over shares of ``params`` in processes, or over torchrun ranks (rank 0
    gets every row, the others an empty list); ``None`` when one process should do it."""
    order = {p.name: i for i, p in enumerate(params)}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from paramctl.tensors import dist_info

        dist = dist_info()
        shares = _split(params, dist.world)
        mine = worker(spec, options, prefix, [n for n in shares[dist.rank]])
        import torch.distributed as tdist

        gathered: list[Any] = [None] * dist.world
        tdist.all_gather_object(gathered, mine)
        # Leave the group before the interpreter exits: a gloo group torn down at exit
        # aborts the process ("terminate called without an active exception").
        tdist.barrier()
        tdist.destroy_process_group()
        if dist.rank != 0:
            return []
        rows = [r for part in gathered for r in part]
        return sorted(rows, key=lambda r: order[r.name])
    total = sum(p.nbytes for p in params)
    n = jobs if jobs is not None else (min(2, os.cpu_count() or 1)
                                       if total >= _PARALLEL_BYTES else 1)
    n = max(1, min(n, len(params)))
    if n == 1:
        return None
    import multiprocessing

    shares = [s for s in _split(params, n) if s]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(len(shares)) as pool:
        parts = pool.starmap(worker, [(spec, options, prefix, s) for s in shares])
    rows = [r for part in parts for r in part]
    return sorted(rows, key=lambda r: order[r.name])
