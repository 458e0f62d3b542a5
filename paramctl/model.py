"""Plain records passed between sources, the core and the renderers."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "BUFFER_NAMES", "DTYPE_SIZES", "FLOAT_DTYPES", "Change", "ChangeResult", "Edit", "InitFn",
    "Inventory", "ParamInfo", "TensorRecord", "Totals", "counted_once", "mark_buffers",
    "tied_groups", "totals",
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


# A file stores tensors, not modules: these last name parts are buffers wherever they occur
# (DESIGN, "What trainable means in a file"). Only names that torch, transformers, timm or
# fairseq register as buffers and never as parameters belong here; ambiguous ones (GPT-2's
# causal mask ``attn.bias``, FrozenBatchNorm's ``weight``) stay out, since ``bias`` and
# ``weight`` are almost always parameters. README.md documents the list.
BUFFER_NAMES = frozenset({
    "running_mean",             # BatchNorm / InstanceNorm running statistics
    "running_var",
    "num_batches_tracked",
    "inv_freq",                 # rotary embeddings (transformers' RotaryEmbedding)
    "original_inv_freq",
    "position_ids",             # BERT-style embeddings
    "token_type_ids",
    "masked_bias",              # GPT-2 (transformers 4.x) attention mask constant
    "causal_mask",              # older Llama-style attention masks
    "final_logits_bias",        # BART / Marian / Pegasus output bias (a registered buffer)
    "relative_position_index",  # Swin relative position tables
    "relative_coords_table",
    "_float_tensor",            # fairseq sinusoidal positional embeddings
})

_BUFFER_ENDINGS = tuple(BUFFER_NAMES)  # a cheap first test for 100,000-tensor listings


def mark_buffers(params: Iterable[ParamInfo]) -> list[ParamInfo]:
    """``params`` with every tensor whose last name part is in :data:`BUFFER_NAMES` marked
    a buffer (never trainable). What a reader already marked a buffer stays one.

    >>> mark_buffers([ParamInfo("bn.running_mean", (8,), "float32", 8, 32, True)])[0].buffer
    True
    """
    return [replace(p, buffer=True, requires_grad=False)
            if not p.buffer and p.name.endswith(_BUFFER_ENDINGS)
            and p.name.rsplit(".", 1)[-1] in BUFFER_NAMES else p
            for p in params]


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


def counted_once(params: Sequence[ParamInfo]) -> list[bool]:
    """For each entry, whether it counts in sums: every untied entry does, and of a tied
    group only the first listed member (so shared storage is counted once).

    >>> [c for c in counted_once([ParamInfo("a", (2,), "float32", 2, 8, True, tied=("b",)),
    ...                            ParamInfo("b", (2,), "float32", 2, 8, True, tied=("a",))])]
    [True, False]
    """
    seen: set[str] = set()
    out: list[bool] = []
    for p in params:
        out.append(not (p.tied and any(t in seen for t in p.tied)))
        seen.add(p.name)
    return out


def totals(params: Sequence[ParamInfo]) -> Totals:
    """Sum a listing, counting each tied group once (by its first listed member)."""
    numel = trainable = frozen = nbytes = 0
    by_dtype: dict[str, int] = {}
    for p, counts in zip(params, counted_once(params), strict=True):
        if not counts:
            continue
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
    """What a source holds: its parameters and a little about the source itself.

    ``metadata`` is what a format records about the model beside its tensors (GGUF's
    ``general.*`` keys), or ``None`` for formats that have no such thing to show.
    """

    source: str
    format: str
    params: list[ParamInfo]
    # What a source says about itself beyond its tensors, by topic: {"adapter": {...}}
    # for a PEFT adapter. None for most sources (and then absent from JSON).
    extra: dict[str, Any] | None = None
    # A GGUF file's general.* metadata ("metadata" in JSON); None elsewhere.
    metadata: dict[str, Any] | None = None


# Called with (name, tensor) for every tensor the edit initialises; changes it in place.
InitFn = Callable[[str, "torch.Tensor"], None]


@dataclass(frozen=True)
class Edit:
    """What a write changes. Names are the source's stored names.

    ``requires_grad`` holds only the names whose flag changes; ``init`` the names to
    re-initialise, each through ``init_fn``.
    """

    requires_grad: Mapping[str, bool] = field(default_factory=dict)
    init: frozenset[str] = frozenset()
    init_fn: InitFn | None = None
    # Output layout, not content: split a single-file source into shards of this size.
    max_shard_size: int | None = None

    @property
    def empty(self) -> bool:
        return not self.requires_grad and not self.init

    def frozen_after(self, frozen: Iterable[str], names: Iterable[str]) -> set[str]:
        """The frozen set once this edit's flags are applied, limited to ``names``."""
        out = set(frozen) & set(names)
        for name, want in self.requires_grad.items():
            if want:
                out.discard(name)
            else:
                out.add(name)
        return out


@dataclass(frozen=True)
class TensorRecord:
    """One tensor in the stream a writer consumes (and ``stats``/``diff`` read).

    Its bytes are either ``nbytes`` contiguous bytes at ``offset`` of the open file ``fd``
    (copied in-kernel, never through Python) or whatever ``load`` returns (a transform: an
    initialised tensor, a strided view made contiguous, a cast).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    frozen: bool
    nbytes: int
    fd: int | None = None
    offset: int = 0
    load: Callable[[], bytes | bytearray] | None = None
    # The same bytes as ``load`` in pieces, for writers that can stream them (a cast of a
    # large tensor then holds a few MiB, not the tensor twice). A piece may be a view of a
    # reused buffer: it stays valid while STREAM_HOLD more pieces are requested.
    stream: Callable[[], Iterable[bytes | bytearray | memoryview]] | None = None


STREAM_HOLD = 2
"""How many more pieces a consumer of :attr:`TensorRecord.stream` may request while it still
holds (e.g. is writing in the background) an earlier one."""


@dataclass(frozen=True)
class Change:
    """One parameter a command changes. ``via`` names the tied name that pulled it in."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    action: str  # "freeze", "unfreeze" or an init call such as "normal(std=0.02)"
    before: bool
    after: bool
    via: str | None = None


@dataclass
class ChangeResult:
    source: str
    format: str
    changes: list[Change]
    unchanged: list[str] = field(default_factory=list)  # selected, already in that state
    skipped: list[str] = field(default_factory=list)  # selected, never trainable
    written: Path | None = None
    warnings: list[str] = field(default_factory=list)  # e.g. what a conversion drops
    notes: list[str] = field(default_factory=list)  # e.g. what apply's convert steps do
