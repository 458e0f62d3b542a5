"""``convert``: checkpoint surgery in one streaming rewrite.

Options apply in DESIGN's order: ``keep`` (only what matches), ``drop``, ``rename``
(``FROM=TO`` prefix or ``re:REGEX=TO``, in order), then ``cast`` (floating-point tensors
among float32/bfloat16/float16/float64, rounding to nearest even, bit for bit what
``tensor.to(dtype)`` gives). ``cast_only`` / ``no_cast`` patterns match the names *after*
renaming. The frozen state, tied groups and the index follow the new names. Every tensor
is read, transformed and written one at a time: memory holds one tensor, not the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from paramctl.errors import OperationError, UsageError
from paramctl.io.files import read_ahead
from paramctl.model import DTYPE_SIZES, FLOAT_DTYPES, Edit, ParamInfo, TensorRecord
from paramctl.patterns import select
from paramctl.rules import Rename, Step, apply_renames, parse_cast, parse_rename
from paramctl.sources.base import OpenOptions
from paramctl.view import Prefixes, View, open_view

if TYPE_CHECKING:
    from paramctl.numeric import CastRing

__all__ = ["ConvertPlan", "ConvertResult", "ConvertRow", "convert", "plan_convert"]

# dtypes a cast may read: the three targets and float64 (through torch, bit for bit).
_CAST_FROM = frozenset({"float32", "bfloat16", "float16", "float64"})


@dataclass(frozen=True)
class ConvertPlan:
    """What to change; patterns follow the selection language."""

    keep: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()
    renames: tuple[Rename, ...] = ()
    cast: str | None = None
    cast_only: tuple[str, ...] = ()
    no_cast: tuple[str, ...] = ()
    allow_overflow: bool = False

    @classmethod
    def parse(cls, *, keep: Sequence[str] = (), drop: Sequence[str] = (),
              rename: Sequence[str] = (), cast: str | None = None,
              cast_only: Sequence[str] = (), no_cast: Sequence[str] = (),
              allow_overflow: bool = False) -> ConvertPlan:
        if (cast_only or no_cast) and cast is None:
            raise UsageError("--cast-only and --no-cast need --cast DTYPE")
        return cls(tuple(keep), tuple(drop), tuple(parse_rename(r) for r in rename),
                   parse_cast(cast) if cast is not None else None, tuple(cast_only),
                   tuple(no_cast), allow_overflow)

    @property
    def empty(self) -> bool:
        return not (self.keep or self.drop or self.renames or self.cast)

    @classmethod
    def from_steps(cls, steps: Sequence[Step]) -> ConvertPlan:
        """The plan of ``apply``'s keep/drop/rename/cast steps: keep and drop patterns
        combine, renames apply in order, the last cast wins."""
        keep: list[str] = []
        drop: list[str] = []
        renames: list[Rename] = []
        cast = None
        only: tuple[str, ...] = ()
        no_cast: tuple[str, ...] = ()
        for step in steps:
            if step.kind == "keep":
                keep += step.patterns
            elif step.kind == "drop":
                drop += step.patterns
            elif step.kind == "rename":
                renames += step.renames
            elif step.kind == "cast":
                cast, only, no_cast = step.dtype, step.patterns, step.excludes
        return cls(tuple(keep), tuple(drop), tuple(renames), cast, only, no_cast)


@dataclass(frozen=True)
class ConvertRow:
    """One tensor of the source: its new name (None when dropped) and dtype."""

    name: str
    new_name: str | None
    shape: tuple[int, ...]
    dtype: str
    new_dtype: str
    nbytes: int
    new_nbytes: int

    @property
    def status(self) -> str:
        if self.new_name is None:
            return "dropped"
        parts = []
        if self.new_name != self.name:
            parts.append("renamed")
        if self.new_dtype != self.dtype:
            parts.append("cast")
        return "+".join(parts) or "kept"


@dataclass
class ConvertResult:
    source: str
    format: str
    rows: list[ConvertRow]
    written: Path | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def bytes_before(self) -> int:
        return sum(r.nbytes for r in self.rows)

    @property
    def bytes_after(self) -> int:
        return sum(r.new_nbytes for r in self.rows if r.new_name is not None)


def plan_convert(params: Sequence[ParamInfo], plan: ConvertPlan, *, allow_empty: bool = False
                 ) -> list[ConvertRow]:
    """Every tensor of ``params`` with what ``plan`` does to it."""
    names = [p.name for p in params]
    kept = set(select(names, plan.keep, allow_empty=allow_empty)) if plan.keep else set(names)
    if plan.drop:
        kept -= set(select(names, plan.drop, allow_empty=allow_empty))
    order = [n for n in names if n in kept]
    new_names = apply_renames(order, plan.renames) if plan.renames else {n: n for n in order}
    cast_set: set[str] = set()
    if plan.cast is not None:
        targets = list(new_names.values())
        chosen = set(select(targets, plan.cast_only, allow_empty=allow_empty)) \
            if plan.cast_only else set(targets)
        if plan.no_cast:
            chosen -= set(select(targets, plan.no_cast, allow_empty=True))
        cast_set = chosen
    rows = []
    for p in params:
        new = new_names.get(p.name)
        dtype = p.dtype
        if new is not None and plan.cast is not None and new in cast_set \
                and p.dtype in FLOAT_DTYPES and p.dtype in _CAST_FROM:
            dtype = plan.cast
        new_bytes = p.numel * DTYPE_SIZES[dtype] if dtype != p.dtype else p.nbytes
        rows.append(ConvertRow(p.name, new, p.shape, p.dtype, dtype, p.nbytes, new_bytes))
    if not any(r.new_name is not None for r in rows):
        raise OperationError("the selection drops every tensor; nothing would be left to write")
    return rows


# Bytes per piece of a streamed cast (several pieces are in flight: read ahead, being cast,
# being written).
_CAST_STEP = 4 << 20


def _source_chunks(record: TensorRecord) -> Iterator[bytes | bytearray | memoryview]:
    """The record's stored bytes in pieces of a few MiB (whole elements)."""
    from paramctl.writers.base import record_bytes

    step = _CAST_STEP
    if record.load is not None or record.fd is None:
        view = memoryview(record_bytes(record))
        for start in range(0, len(view), step):
            yield view[start:start + step]
        return
    yield from read_ahead(record.fd, record.offset, record.nbytes, repr(record.name), step=step)


def _cast_record(record: TensorRecord, row: ConvertRow, allow_overflow: bool,
                 ring: CastRing) -> TensorRecord:
    """``record`` cast to ``row.new_dtype``: streamed through numpy for the float32 /
    bfloat16 / float16 pairs (bit for bit what torch gives), through torch otherwise.
    ``ring``: the output buffers, shared by every cast of one rewrite (a writer reads
    their streams as one sequence)."""
    from paramctl import numeric

    src, dst = record.dtype, row.new_dtype
    base = dataclasses.replace(record, dtype=dst, nbytes=row.new_nbytes, fd=None)
    if src in numeric.CASTABLE and dst in numeric.CASTABLE:
        def stream() -> Iterator[bytes | bytearray | memoryview]:
            return numeric.cast_chunks(_source_chunks(record), src, dst, name=record.name,
                                       allow_overflow=allow_overflow, ring=ring)

        return dataclasses.replace(base, stream=stream,
                                   load=lambda: b"".join(bytes(p) for p in stream()))

    def load() -> bytes:
        from paramctl.writers.base import record_bytes

        return cast_bytes(record_bytes(record), src, dst, name=record.name,
                          allow_overflow=allow_overflow)

    return dataclasses.replace(base, load=load)


def cast_bytes(data: bytes | bytearray, src: str, dst: str, *, name: str,
               allow_overflow: bool) -> bytes:
    """Cast raw elements; numpy for the float32/bfloat16/float16 pairs, torch otherwise."""
    from paramctl import numeric

    if src in numeric.CASTABLE and dst in numeric.CASTABLE:
        return bytes(numeric.cast_bytes(data, src, dst, name=name, allow_overflow=allow_overflow))
    import torch

    from paramctl.tensors import frombuffer, tensor_bytes, torch_dtype

    tensor = frombuffer(bytearray(data), src)
    out = tensor.to(torch_dtype(dst))
    if not allow_overflow and dst == "float16":
        overflow = int((torch.isfinite(tensor) & ~torch.isfinite(out)).sum())
        if overflow:
            raise OperationError(f"{name}: {overflow} values overflow float16 (max 65504); "
                                 "pass --allow-overflow to turn them into inf")
    return tensor_bytes(out)


def transform(records: Sequence[TensorRecord], rows: Sequence[ConvertRow],
              stored: dict[str, str], allow_overflow: bool) -> list[TensorRecord]:
    """Apply the planned drops, renames and casts to a source's record stream."""
    by_stored = {stored[r.name]: r for r in rows}
    out = []
    ring = None
    for rec in records:
        row = by_stored[rec.name]
        if row.new_name is None:
            continue
        new = dataclasses.replace(rec, name=row.new_name)
        if row.new_dtype != row.dtype:
            if ring is None:
                from paramctl.numeric import CastRing

                ring = CastRing()
            new = _cast_record(new, row, allow_overflow, ring)
        out.append(new)
    return out


def describe_rows(rows: Sequence[ConvertRow]) -> list[str]:
    """One line per kind of change, for ``apply``'s output."""
    dropped = sum(r.new_name is None for r in rows)
    renamed = sum(r.new_name not in (None, r.name) for r in rows)
    cast = sum(r.new_name is not None and r.new_dtype != r.dtype for r in rows)
    parts = [f"{n} {what}" for n, what in ((dropped, "dropped"), (renamed, "renamed"),
                                           (cast, "cast")) if n]
    return [f"convert: {', '.join(parts)}"] if parts else []


def write_plan(view: View, rows: Sequence[ConvertRow], plan: ConvertPlan, out: Path | None,
               *, edit: Edit | None = None, max_shard_size: int | None = None,
               progress: Callable[[int], None] | None = None, force: bool = False,
               wait: float = 0.0) -> Path:
    """Write ``view``'s source with ``rows`` applied (and ``edit``'s flags and inits)."""
    from paramctl.writers import write_converted

    stored_new = {view.stored[r.name]: r.new_name for r in rows}
    casts = {view.stored[r.name] for r in rows if r.new_name and r.new_dtype != r.dtype}
    return write_converted(
        view.source, lambda recs: transform(recs, rows, view.stored, plan.allow_overflow),
        out, renames={k: v for k, v in stored_new.items() if v is not None},
        drops={k for k, v in stored_new.items() if v is None}, casts=casts,
        edit=edit or Edit(), max_shard_size=max_shard_size, progress=progress, force=force,
        wait=wait)


def convert(spec: str, plan: ConvertPlan, *, out: Path | None = None,
            options: OpenOptions | None = None, prefix: Prefixes = None,
            max_shard_size: int | None = None, dry_run: bool = False,
            allow_empty: bool = False, force: bool = False, wait: float = 0.0,
            progress: Callable[[int, int], None] | None = None) -> ConvertResult:
    """Rename, keep/drop and cast the tensors of ``spec`` in one streaming rewrite.

    >>> convert("ckpt.pt", ConvertPlan.parse(rename=["module.="]), out=Path("out.pt"))
    ... # doctest: +SKIP
    """
    if plan.empty and out is None and max_shard_size is None:
        raise UsageError("nothing to do: give --keep, --drop, --rename, --cast or -o OUT")
    if out is not None and not dry_run:
        from paramctl.writers import output_kind

        output_kind(out)  # a mistyped -o fails before the open, not after
    view = open_view(spec, options, prefix=prefix)
    if view.source.format == "module":
        raise UsageError(f"{spec} is a module path; convert reads checkpoint files (write one "
                         "first with `paramctl freeze ... -o OUT`)")
    rows = plan_convert(view.params, plan, allow_empty=allow_empty)
    result = ConvertResult(view.source.display, view.source.format, rows)
    if prefix:
        result.warnings.append(f"--strip-prefix {prefix!r} also renames what is written")
    if getattr(view.source, "key_path", None) and any(
            r.new_name not in (r.name, None) for r in rows):
        result.warnings.append("optimizer state is keyed by parameter position, so renames "
                               "do not change it")
    if dry_run:
        return result
    total = sum(r.new_nbytes for r in rows if r.new_name is not None)
    step = (lambda n: progress(n, total)) if progress is not None else None
    result.written = write_plan(view, rows, plan, out, max_shard_size=max_shard_size,
                                progress=step, force=force, wait=wait)
    return result
