"""Plain records passed between sources, the core and the renderers."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "DTYPE_SIZES", "FLOAT_DTYPES", "Inventory", "ParamInfo", "Totals", "tied_groups", "totals",
]

# Bytes per element for every dtype paramctl can describe without torch. Sub-byte and
# packed types count whole storage bytes (float4_e2m1fn_x2 packs two values in a byte).
DTYPE_SIZES: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "float4_e2m1fn_x2": 1,
    "complex128": 16,
    "complex64": 8,
    "complex32": 4,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint64": 8,
    "uint32": 4,
    "uint16": 2,
    "uint8": 1,
    "bool": 1,
    "qint8": 1,
    "quint8": 1,
    "qint32": 4,
    "quint4x2": 1,
    "quint2x4": 1,
    "bits8": 1,
    "bits16": 2,
    "bits1x8": 1,
    "bits2x4": 1,
    "bits4x2": 1,
}

# dtypes whose tensors can carry gradients; everything else is never trainable.
FLOAT_DTYPES = frozenset(
    {
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "float4_e2m1fn_x2",
        "complex128",
        "complex64",
        "complex32",
    }
)


@dataclass(frozen=True)
class ParamInfo:
    """One named tensor as paramctl reports it.

    ``requires_grad`` is the effective trainable flag: for files, a floating-point tensor
    is trainable unless the file records it frozen. ``tied`` names the other entries that
    share this tensor's storage, or is empty.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    nbytes: int
    requires_grad: bool
    buffer: bool = False
    tied: tuple[str, ...] = ()

    @property
    def shape_text(self) -> str:
        return "x".join(str(d) for d in self.shape) if self.shape else "scalar"


@dataclass(frozen=True)
class Totals:
    """Counts over a listing; tied tensors are counted once. ``trainable`` and ``frozen``
    count floating-point parameters only, so with buffers or integer tensors they add up to
    less than ``numel``."""

    numel: int
    trainable: int
    frozen: int
    nbytes: int
    by_dtype: dict[str, int]
    tensors: int


def tied_groups(keyed: Iterable[tuple[str, Hashable]]) -> dict[str, tuple[str, ...]]:
    """``name -> the other names with the same key`` (a tied group), in listing order.

    The key is whatever identifies one tensor in a format: a storage and view in a ``.pt``,
    the ``Parameter`` object in a module.
    """
    pairs = list(keyed)
    groups: dict[Hashable, list[str]] = {}
    for name, key in pairs:
        groups.setdefault(key, []).append(name)
    return {name: tuple(n for n in groups[key] if n != name) for name, key in pairs}


def totals(params: Sequence[ParamInfo]) -> Totals:
    """Sum a listing, counting each tied group once (by its first listed member)."""
    seen: set[str] = set()
    numel = trainable = frozen = nbytes = 0
    by_dtype: dict[str, int] = {}
    for p in params:
        if p.tied and any(t in seen for t in p.tied):
            seen.add(p.name)
            continue
        seen.add(p.name)
        numel += p.numel
        nbytes += p.nbytes
        by_dtype[p.dtype] = by_dtype.get(p.dtype, 0) + p.nbytes
        # Buffers and integer tensors are neither: they never train, nor are they frozen.
        if p.buffer or p.dtype not in FLOAT_DTYPES:
            continue
        if p.requires_grad:
            trainable += p.numel
        else:
            frozen += p.numel
    return Totals(numel, trainable, frozen, nbytes, by_dtype, len(params))


@dataclass(frozen=True)
class Inventory:
    """What a source holds: its parameters and a little about the source itself."""

    source: str
    format: str
    params: list[ParamInfo]
