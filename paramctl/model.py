"""Plain records passed between sources, the core and the renderers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["DTYPE_SIZES", "FLOAT_DTYPES", "Inventory", "ParamInfo", "Totals", "totals"]

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
    share this tensor's storage, or is empty. ``storage`` identifies the storage for tie
    detection (format specific) and is not part of the public output.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    nbytes: int
    requires_grad: bool
    buffer: bool = False
    tied: tuple[str, ...] = ()
    storage: str | None = field(default=None, compare=False, repr=False)

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
    # Names of tensors the source records as frozen (subset of params' names).
    notes: tuple[str, ...] = ()
