"""The numbers inside tensors: decoding, float64 statistics and bit-exact casts, without torch.

Every function here reads raw little-endian tensor bytes, streamed in chunks, so a
multi-GB checkpoint is never held in memory:

* :func:`tensor_stats` -- min, max, mean, std, l2 and zero/NaN/Inf counts, in float64;
* :func:`diff_metrics` -- max |a-b|, relative L2 and cosine between two tensors;
* :func:`cast_bytes` / :func:`cast_chunks` -- float32/bfloat16/float16 conversions equal
  bit for bit to torch's ``tensor.to(dtype)``.

>>> s = tensor_stats([b"\\x80\\x3f\\x00\\xc0"], "bfloat16", 2)  # 1.0 and -2.0
>>> s.min, s.max, s.mean, s.std, s.zeros, s.nan
(-2.0, 1.0, -0.5, 1.5, 0, 0)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache, partial
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from paramctl.errors import OperationError

if TYPE_CHECKING:
    import numpy.typing as npt

    Array = npt.NDArray[Any]
    # Decodes one block of raw elements into ``out`` (float64) and returns ``out``.
    Decoder = Callable[[Array, Array, "_Workspace"], Array]
    # Casts one block of raw elements into ``out``; returns how many finite values overflowed.
    CastKernel = Callable[[Array, Array, "_Workspace"], int]

__all__ = [
    "CASTABLE",
    "CAST_HOLD",
    "DECODABLE",
    "CastRing",
    "DiffMetrics",
    "TensorStats",
    "cast_bytes",
    "cast_chunks",
    "chunk_bytes",
    "diff_metrics",
    "tensor_stats",
]

Chunk = bytes | bytearray | memoryview

# Backend: numpy at every size, never torch. Measured on the 2-core benchmark machine,
# which other jobs kept busy (load 3-14), so in CPU seconds on one thread; 500 M random
# bf16 values in 4 MiB chunks, the same block algorithm written with each library:
#   stats  numpy 0.76-0.88 s   torch 0.89 s
#   diff   numpy 1.68-1.79 s   torch 1.43 s   (a second bf16 tensor)
#   cast   numpy 0.64 s        torch 0.37 s   (bf16 -> float16)
# torch wins only the cast, by less than `import torch` costs (1.2 s, and 270 MiB of RSS
# against the commands' 300 MiB budget); with 2 threads on the busy machine its OpenMP
# workers spin (5.2 s CPU for the stats, import included). The 2.5 GiB bf16 reference
# file in a fresh process: stats 2.0-2.3 s CPU, cast 1.6-1.9 s, diff of 10 % of it
# 0.51-0.57 s, each under 60 MiB.
# Per value, what made numpy fast: shifts (0.12 ns) and lookup tables built once (0.6 ns)
# decode, since ml_dtypes' casts keep the GIL (its dtypes are flagged NPY_NEEDS_PYAPI)
# and bf16 -> f16 costs 1.4 ns there; numpy's own f32 -> f16 cast takes 61 ns on random
# bits (1.7 on weights), the bit-twiddling below 2.5 (1.6); 64 Ki-value blocks stay in
# cache (stats: 1.51 ns at 32 Ki, 1.38 at 64 Ki, 1.47 at 256 Ki); a fresh output array per
# chunk cost 246,000 page faults (+0.5 s CPU per GB), so one is reused. Big tensors are
# split over a thread pool: numpy drops the GIL inside its loops, and the Python between
# them (8.5 us a block, ~10 %) is all that keeps it. The reference file with and without
# the pool, process start included, load 3-4: stats 2.5-4.2 s against 2.8-6.4 s (CPU
# +0-10 %), cast 2.1-2.9 s against 2.5-3.7 s; the machine never idled long enough to
# measure two free cores. np.dot is not used: OpenBLAS starts threads of its own that
# fight the pool; squares are summed pairwise instead (also more accurate).

# Raw storage of each decodable dtype, as a numpy dtype string. 16- and 8-bit floats are
# read as unsigned integers: numpy has no bfloat16/float8, and they are decoded by shifts
# or lookup tables (see _decoder).
_STORAGE: dict[str, str] = {
    "float64": "<f8",
    "float32": "<f4",
    "float16": "<u2",
    "bfloat16": "<u2",
    "float8_e4m3fn": "u1",
    "float8_e5m2": "u1",
    "float8_e4m3fnuz": "u1",
    "float8_e5m2fnuz": "u1",
    "float8_e8m0fnu": "u1",
    "int8": "i1",
    "int16": "<i2",
    "int32": "<i4",
    "int64": "<i8",
    "uint8": "u1",
    "uint16": "<u2",
    "uint32": "<u4",
    "uint64": "<u8",
    "bool": "u1",
}
_ITEMSIZE: dict[str, int] = {name: int(code[-1]) for name, code in _STORAGE.items()}
_FLOATS = frozenset(name for name in _STORAGE if name.startswith(("float", "bfloat")))

DECODABLE: frozenset[str] = frozenset(_STORAGE)
"""torch dtype names (``str(dtype)`` without ``torch.``) whose values this module reads."""

CASTABLE: frozenset[str] = frozenset({"float32", "bfloat16", "float16"})
"""dtypes :func:`cast_bytes` converts between."""

# Values per block: a float64 block (512 KiB) and its scratch stay in one core's L2 cache.
_BLOCK = 1 << 16
# Below this many values a thread pool costs more than it saves.
_POOL_MIN = 1 << 21
_CHUNK_BYTES = 4 << 20
_MAX_WORKERS = 4


def chunk_bytes(dtype: str) -> int:
    """A good chunk size in bytes for streaming ``dtype``: 4 MiB, a whole number of items.

    >>> chunk_bytes("bfloat16")
    4194304
    """
    _itemsize(dtype)
    return _CHUNK_BYTES


@dataclass(frozen=True)
class TensorStats:
    """What :func:`tensor_stats` found; the field order is the output column order.

    ``min``/``max``/``mean``/``std`` (population) and ``l2`` are over the finite values and
    ``None`` when there are none (or the tensor is empty); the counts are over all values.
    """

    numel: int
    min: float | None
    max: float | None
    mean: float | None
    std: float | None
    l2: float | None
    zeros: int
    nan: int
    inf: int


@dataclass(frozen=True)
class DiffMetrics:
    """How two same-shaped tensors differ, over the positions where both are finite.

    ``max_abs`` is ``None`` when there is no such position, ``rel_l2`` when ||a|| = 0 and
    ``cosine`` when either norm is 0.
    """

    max_abs: float | None
    rel_l2: float | None
    cosine: float | None


# -- shared mechanics -----------------------------------------------------------------------

def _itemsize(dtype: str) -> int:
    try:
        return _ITEMSIZE[dtype]
    except KeyError:
        raise OperationError(
            f"cannot decode dtype {dtype!r}; readable dtypes: {', '.join(sorted(DECODABLE))}"
        ) from None


def _truncated(dtype: str, numel: int, got: int) -> OperationError:
    expected = numel * _ITEMSIZE[dtype]
    return OperationError(
        f"{dtype} data of {numel} elements should be {expected} bytes, got {got}: "
        "truncated or corrupt data"
    )


def _raw(chunk: Chunk, dtype: str) -> Array:
    """The elements of one chunk as a numpy view in their storage dtype (no copy)."""
    import numpy as np

    data = np.frombuffer(chunk, dtype=np.uint8)
    if data.size % _ITEMSIZE[dtype]:
        raise OperationError(
            f"a chunk of {data.size} bytes does not hold whole {dtype} elements"
        )
    return data.view(_STORAGE[dtype])


class _Workspace:
    """Scratch arrays for one worker, reused block after block (fresh pages are slow)."""

    def __init__(self) -> None:
        self._arrays: dict[tuple[str, str], Array] = {}

    def get(self, key: str, dtype: str) -> Array:
        array = self._arrays.get((key, dtype))
        if array is None or array.shape[0] < _BLOCK:
            import numpy as np

            array = self._arrays[key, dtype] = np.empty(_BLOCK, dtype=dtype)
        return array


def _workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, _MAX_WORKERS))


_R = TypeVar("_R")


class _Runner:
    """Applies a function to the blocks of each span, split over a thread pool if big.

    The caller waits for every span before asking its iterator for the next chunk, so a
    source may reuse one buffer for all its chunks.
    """

    def __init__(self, numel: int) -> None:
        self.workers = _workers() if numel >= _POOL_MIN else 1
        self.spaces = [_SPACES.pop() if _SPACES else _Workspace() for _ in range(self.workers)]
        self.pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None

    def __enter__(self) -> _Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        _SPACES.extend(self.spaces)


    def map(self, n: int, fn: Callable[[int, int, _Workspace], _R]) -> list[_R]:
        """``fn(start, stop, workspace)`` for every block of ``range(n)``, in order."""
        if self.pool is None or n < 2 * _BLOCK:
            return _run_blocks(fn, 0, n, self.spaces[0])
        blocks = -(-n // _BLOCK)
        per_worker = -(-blocks // self.workers) * _BLOCK
        futures = [
            self.pool.submit(_run_blocks, fn, start, min(start + per_worker, n), space)
            for start, space in zip(range(0, n, per_worker), self.spaces, strict=False)
        ]
        return [result for future in futures for result in future.result()]


# Workspaces of finished runners, for the next one: a cast or a stats run makes a runner
# per tensor, and fresh scratch pages cost a fault per 4 KiB each time.
_SPACES: list[_Workspace] = []


def _run_blocks(fn: Callable[[int, int, _Workspace], _R], start: int, stop: int,
                space: _Workspace) -> list[_R]:
    import numpy as np

    # inf - inf, overflowing squares and NaN casts are expected and handled; numpy's
    # error state is per thread, so it is set here, in the thread doing the work.
    with np.errstate(all="ignore"):
        return [fn(i, min(i + _BLOCK, stop), space) for i in range(start, stop, _BLOCK)]


# -- decoding -------------------------------------------------------------------------------

@cache
def _decode_table(dtype: str) -> Array:
    """float64 value of every bit pattern of a 16- or 8-bit dtype (built once, read-only)."""
    import numpy as np

    if dtype == "float16":
        table = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    elif dtype == "bool":
        table = np.arange(256) != 0
    elif dtype == "float8_e8m0fnu":
        # Exponent only: 2**(bits - 127); 0xFF is NaN. Written out: ml_dtypes 0.4, which
        # the project still allows, does not have this type.
        exponents = np.arange(256, dtype=np.float64) - 127
        table = np.where(exponents == 128, np.nan, np.exp2(exponents))
    else:
        import ml_dtypes

        table = np.arange(256, dtype=np.uint8).view(getattr(ml_dtypes, dtype))
    result = table.astype(np.float64)
    result.flags.writeable = False
    return result


def _decode_bf16(raw: Array, out: Array, space: _Workspace) -> Array:
    import numpy as np

    # A bfloat16 is the top half of a float32: shifting is exact and releases the GIL.
    bits = space.get("u32", "u4")[: raw.shape[0]]
    np.left_shift(raw, 16, out=bits, dtype=np.uint32)
    np.copyto(out, bits.view(np.float32))
    return out


def _decode_table_lookup(table: Array, raw: Array, out: Array, space: _Workspace) -> Array:
    import numpy as np

    index = space.get("index", "intp")[: raw.shape[0]]
    np.copyto(index, raw)  # take() would otherwise allocate an intp copy per call
    np.take(table, index, out=out, mode="clip")  # "clip" skips the buffered bounds check
    return out


def _decode_cast(raw: Array, out: Array, space: _Workspace) -> Array:
    import numpy as np

    np.copyto(out, raw, casting="unsafe")
    return out


def _decoder(dtype: str) -> Decoder:
    if dtype == "bfloat16":
        return _decode_bf16
    if (_STORAGE[dtype] == "u1" and dtype != "uint8") or dtype == "float16":
        return partial(_decode_table_lookup, _decode_table(dtype))
    return _decode_cast


# -- stats ----------------------------------------------------------------------------------

class _StatsPart(NamedTuple):
    """One block's finite values: count, mean, sum of squared deviations, extremes.

    The mean is kept as ``mean + correction``: a float64 near 1e8 is only good to 1e-8,
    which is too coarse to combine blocks when the std is 1 (see _combine_stats).
    """

    n: int
    mean: float
    correction: float
    m2: float
    lo: float
    hi: float
    zeros: int
    nan: int
    inf: int


def _stats_block(raw: Array, decode: Decoder, floating: bool, start: int, stop: int,
                 space: _Workspace) -> _StatsPart:
    import numpy as np

    n = stop - start
    x = decode(raw[start:stop], space.get("f64", "f8")[:n], space)
    mask = space.get("mask", "?")[:n]
    total = float(np.add.reduce(x))
    nan = inf = 0
    # A finite sum means every value is finite (NaN and Inf propagate; float32 and smaller
    # cannot overflow a float64 sum), so the finite mask is only built when needed.
    if floating and not math.isfinite(total):
        finite = np.isfinite(x, out=mask)
        count = int(np.count_nonzero(finite))
        nan = int(np.count_nonzero(np.isnan(x)))
        inf = n - count - nan
        x = x[finite]
        n = count
        if n == 0:
            return _StatsPart(0, 0.0, 0.0, 0.0, math.inf, -math.inf, 0, nan, inf)
        total = float(np.add.reduce(x))
        mask = mask[:n]
    zeros = int(np.count_nonzero(np.equal(x, 0.0, out=mask)))
    lo, hi = float(x.min()), float(x.max())
    if lo == hi:  # constant (a norm's weight of ones): exactly that mean, no spread
        return _StatsPart(n, lo, 0.0, 0.0, lo, hi, zeros, nan, inf)
    mean = total / n
    # Two passes within the block: squared deviations from its own mean (no cancellation
    # when |mean| >> std), and their plain sum, which is the rounding error of the mean.
    deviations = np.subtract(x, mean, out=x)
    residual = float(np.add.reduce(deviations))
    m2 = float(np.add.reduce(np.square(deviations, out=deviations))) - residual * residual / n
    return _StatsPart(n, mean, residual / n, max(m2, 0.0), lo, hi, zeros, nan, inf)


def _combine_stats(numel: int, parts: list[_StatsPart]) -> TensorStats:
    zeros = sum(p.zeros for p in parts)
    nan = sum(p.nan for p in parts)
    inf = sum(p.inf for p in parts)
    finite = [p for p in parts if p.n]
    count = sum(p.n for p in finite)
    if not count:
        return TensorStats(numel, None, None, None, None, None, zeros, nan, inf)
    # Chan et al.'s pairwise update summed over all blocks at once: M2 = sum(m2_b) +
    # sum(n_b (mean_b - mean)^2), with fsum so the order of the blocks does not matter.
    # Block means are taken relative to the first one: when |mean| >> std they are all
    # close, so the differences are exact and keep their corrections' precision.
    origin = finite[0].mean
    offsets = [(p.mean - origin) + p.correction for p in finite]
    offset = math.fsum(p.n * o for p, o in zip(finite, offsets, strict=True)) / count
    m2 = math.fsum(p.m2 + p.n * (o - offset) ** 2 for p, o in zip(finite, offsets, strict=True))
    squares = math.fsum(p.m2 + p.n * (p.mean + p.correction) ** 2 for p in finite)
    return TensorStats(
        numel=numel,
        min=min(p.lo for p in finite),
        max=max(p.hi for p in finite),
        mean=origin + offset,
        std=math.sqrt(m2 / count),
        l2=math.sqrt(squares),
        zeros=zeros,
        nan=nan,
        inf=inf,
    )


def tensor_stats(chunks: Iterable[Chunk], dtype: str, numel: int) -> TensorStats:
    """Statistics of one tensor whose raw little-endian bytes arrive in ``chunks``.

    Each chunk holds whole elements and is only read until the next one is requested, so
    a source may reuse one buffer. The chunks must add up to ``numel`` elements.
    ``min``/``max``/``mean``/``std`` (population) and ``l2`` are over the finite values,
    accumulated in float64; bool counts as 0/1.

    >>> import struct
    >>> tensor_stats([struct.pack("<3f", 1.0, float("nan"), 3.0)], "float32", 3).mean
    2.0

    Raises OperationError for a dtype it cannot decode or data of the wrong length.
    """
    _itemsize(dtype)
    decode = _decoder(dtype)
    floating = dtype in _FLOATS
    expected = numel * _ITEMSIZE[dtype]
    got = 0
    parts: list[_StatsPart] = []
    with _Runner(numel) as runner:
        for chunk in chunks:
            raw = _raw(chunk, dtype)
            got += raw.nbytes
            if got > expected:
                raise _truncated(dtype, numel, got)
            parts += runner.map(raw.shape[0], partial(_stats_block, raw, decode, floating))
    if got != expected:
        raise _truncated(dtype, numel, got)
    return _combine_stats(numel, parts)


# -- diff -----------------------------------------------------------------------------------

class _DiffPart(NamedTuple):
    n: int
    aa: float
    bb: float
    ab: float
    dd: float
    max_abs: float


class _Stream:
    """One side of a diff: hands out element spans of at most a given length, across
    chunk boundaries, and checks that the chunks add up to the expected size."""

    def __init__(self, chunks: Iterable[Chunk], dtype: str, numel: int) -> None:
        import numpy as np

        self.chunks = iter(chunks)
        self.dtype = dtype
        self.numel = numel
        self.got = 0
        self.current: Array = np.empty(0, dtype=_STORAGE[dtype])
        self.pos = 0

    def available(self) -> int:
        """Elements left in the current chunk, reading the next one when it is used up."""
        while self.pos == self.current.shape[0]:
            chunk = next(self.chunks, None)
            if chunk is None:
                return 0
            self.current, self.pos = _raw(chunk, self.dtype), 0
            self.got += self.current.nbytes
            if self.got > self.numel * _ITEMSIZE[self.dtype]:
                raise _truncated(self.dtype, self.numel, self.got)
        return int(self.current.shape[0] - self.pos)

    def take(self, n: int) -> Array:
        span = self.current[self.pos:self.pos + n]
        self.pos += n
        return span

    def finish(self) -> None:
        while self.available():
            self.pos = self.current.shape[0]
        if self.got != self.numel * _ITEMSIZE[self.dtype]:
            raise _truncated(self.dtype, self.numel, self.got)


def _diff_block(raw_a: Array, decode_a: Decoder, raw_b: Array, decode_b: Decoder,
                floating: bool, start: int, stop: int, space: _Workspace) -> _DiffPart:
    import numpy as np

    n = stop - start
    a = decode_a(raw_a[start:stop], space.get("f64", "f8")[:n], space)
    b = decode_b(raw_b[start:stop], space.get("f64b", "f8")[:n], space)
    scratch = space.get("f64c", "f8")[:n]
    aa = float(np.add.reduce(np.square(a, out=scratch)))
    bb = float(np.add.reduce(np.square(b, out=scratch)))
    # As in _stats_block: finite sums of squares mean both sides are all finite.
    if floating and not (math.isfinite(aa) and math.isfinite(bb)):
        both = np.isfinite(a) & np.isfinite(b)
        a, b = a[both], b[both]
        n = a.shape[0]
        if n == 0:
            return _DiffPart(0, 0.0, 0.0, 0.0, 0.0, 0.0)
        scratch = scratch[:n]
        aa = float(np.add.reduce(np.square(a, out=scratch)))
        bb = float(np.add.reduce(np.square(b, out=scratch)))
    ab = float(np.add.reduce(np.multiply(a, b, out=scratch)))
    d = np.abs(np.subtract(a, b, out=scratch), out=scratch)
    max_abs = float(d.max())
    dd = float(np.add.reduce(np.square(d, out=d)))
    return _DiffPart(n, aa, bb, ab, dd, max_abs)


def diff_metrics(chunks_a: Iterable[Chunk], dtype_a: str, chunks_b: Iterable[Chunk],
                 dtype_b: str, numel: int) -> DiffMetrics:
    """Compare two tensors of ``numel`` elements streamed as raw bytes, in float64.

    The dtypes may differ (both sides are decoded to float64) and so may the chunk sizes.
    Over the positions where both values are finite: ``max_abs`` = max |a-b|, ``rel_l2`` =
    ||a-b|| / ||a||, ``cosine`` = a.b / (||a|| ||b||).

    >>> import struct
    >>> diff_metrics([struct.pack("<2f", 3.0, 4.0)], "float32",
    ...              [struct.pack("<2d", 3.0, 0.0)], "float64", 2)
    DiffMetrics(max_abs=4.0, rel_l2=0.8, cosine=0.6)

    Raises OperationError for a dtype it cannot decode or data of the wrong length.
    """
    _itemsize(dtype_a)
    _itemsize(dtype_b)
    side_a = _Stream(chunks_a, dtype_a, numel)
    side_b = _Stream(chunks_b, dtype_b, numel)
    decode_a, decode_b = _decoder(dtype_a), _decoder(dtype_b)
    floating = dtype_a in _FLOATS or dtype_b in _FLOATS
    parts: list[_DiffPart] = []
    with _Runner(numel) as runner:
        while n := min(side_a.available(), side_b.available()):
            block = partial(_diff_block, side_a.take(n), decode_a, side_b.take(n), decode_b,
                            floating)
            parts += runner.map(n, block)
    side_a.finish()
    side_b.finish()
    return _combine_diff(parts)


def _combine_diff(parts: list[_DiffPart]) -> DiffMetrics:
    parts = [p for p in parts if p.n]
    if not parts:
        return DiffMetrics(None, None, None)
    aa = math.fsum(p.aa for p in parts)
    bb = math.fsum(p.bb for p in parts)
    dot = math.fsum(p.ab for p in parts)
    rel_l2 = math.sqrt(math.fsum(p.dd for p in parts)) / math.sqrt(aa) if aa else None
    cosine = None
    if aa and bb:
        # sqrt(aa * bb) rather than sqrt(aa) * sqrt(bb): equal tensors then give exactly
        # 1.0 (sqrt(aa**2) == aa in binary floating point), unless the product leaves the
        # float64 range.
        product = aa * bb
        norms = math.sqrt(product) if 0 < product < math.inf else math.sqrt(aa) * math.sqrt(bb)
        # Clamped: rounding can put the quotient a hair outside [-1, 1].
        cosine = max(-1.0, min(1.0, dot / norms))
    return DiffMetrics(max(p.max_abs for p in parts), rel_l2, cosine)


# -- casts ----------------------------------------------------------------------------------
#
# Each cast equals torch's tensor.to(dst) bit for bit, NaN payloads included (found by
# converting every NaN pattern with torch 2.13 on CPU):
#   bfloat16 -> float16: sign | 0x7E00 | payload << 3   (quieted, payload kept)
#   float16 -> bfloat16: 0x7FC0                          (canonical, sign dropped)
#   bfloat16 -> float32: the bits shifted (payload and signalling bit kept)
#   float16 -> float32:  sign | 0x7FC00000 | payload << 13 (quieted, payload kept)
#   float32 -> bfloat16: 0xFFFF
#   float32 -> float16:  sign | 0x7E00 | payload >> 13
# torch is itself inconsistent for float16 -> float32: the scalar tail of each thread's
# range (the last < 16 values) gives 0x7FFFFFFF instead, so the NaN bits of a tensor depend
# on its length and on torch's thread count. The vectorised result above is what every
# other position gets, so it is the one matched here.

# Casts work on the bits: every castable dtype read as an unsigned integer.
_BITS = {"float32": "<u4", "bfloat16": "<u2", "float16": "<u2"}

_F16_MAX_MSG = "values overflow float16 (max 65504); pass --allow-overflow to turn them into inf"


@cache
def _cast_table(src: str, dst: str) -> Array:
    """``dst`` bits for every ``src`` bit pattern of a 16-bit source (built once, read-only)."""
    import numpy as np

    with np.errstate(all="ignore"):  # NaN and overflow casts are the point here
        return _build_cast_table(src, dst)


def _build_cast_table(src: str, dst: str) -> Array:
    import ml_dtypes
    import numpy as np

    bits = np.arange(1 << 16, dtype=np.uint32)
    sign = bits & 0x8000
    if src == "bfloat16":
        values = bits.astype(np.uint16).view(ml_dtypes.bfloat16)
        payload, is_nan = bits & 0x7F, (bits & 0x7FFF) > 0x7F80
    else:
        values = bits.astype(np.uint16).view(np.float16)
        payload, is_nan = bits & 0x3FF, (bits & 0x7FFF) > 0x7C00
    if dst == "float32":  # from float16 only; bfloat16 -> float32 is a shift
        table = values.astype(np.float32).view(np.uint32)
        nan_bits = (sign << 16) | 0x7FC00000 | (payload << 13)
    elif dst == "float16":
        table = values.astype(np.float16).view(np.uint16).astype(np.uint32)
        nan_bits = sign | 0x7E00 | (payload << 3)
    else:
        table = values.astype(ml_dtypes.bfloat16).view(np.uint16).astype(np.uint32)
        nan_bits = np.full_like(bits, 0x7FC0)
    table = np.where(is_nan, nan_bits, table).astype(_BITS[dst])
    table.flags.writeable = False
    return table


def _f16_overflow(src: str, raw: Array, out: Array, space: _Workspace) -> int:
    """Finite values that became +-inf: infinities out minus infinities in."""
    import numpy as np

    magnitude = space.get("u16", "u2")[: out.shape[0]]
    np.bitwise_and(out, 0x7FFF, out=magnitude)
    if magnitude.max() < 0x7C00:  # no inf or NaN at all: the common case, one pass
        return 0
    inf_out = int(np.count_nonzero(magnitude == 0x7C00))
    if src == "bfloat16":
        inf_in = int(np.count_nonzero((raw & 0x7FFF) == 0x7F80))
    else:
        inf_in = int(np.count_nonzero((raw & 0x7FFFFFFF) == 0x7F800000))
    return inf_out - inf_in


def _cast_table_lookup(src: str, dst: str, raw: Array, out: Array, space: _Workspace) -> int:
    import numpy as np

    index = space.get("index", "intp")[: raw.shape[0]]
    np.copyto(index, raw)
    np.take(_cast_table(src, dst), index, out=out, mode="clip")
    return _f16_overflow(src, raw, out, space) if dst == "float16" else 0


def _cast_bf16_f32(raw: Array, out: Array, space: _Workspace) -> int:
    import numpy as np

    np.left_shift(raw, 16, out=out, dtype=np.uint32)
    return 0


def _cast_f32_bf16(raw: Array, out: Array, space: _Workspace) -> int:
    import numpy as np

    # Round to nearest even on the bits: add 0x7FFF plus the lowest kept bit, then drop
    # the low half. Overflow carries into the exponent and gives inf, as it should.
    bits = space.get("u32", "u4")[: raw.shape[0]]
    np.right_shift(raw, 16, out=bits)
    np.bitwise_and(bits, 1, out=bits)
    np.add(bits, 0x7FFF, out=bits)
    np.add(bits, raw, out=bits)  # wraps only for NaNs, which are replaced below
    np.right_shift(bits, 16, out=bits)
    np.copyto(out, bits, casting="unsafe")
    magnitude = np.bitwise_and(raw, 0x7FFFFFFF, out=bits)
    if magnitude.max() > 0x7F800000:
        out[magnitude > 0x7F800000] = 0xFFFF
    return 0


def _cast_f32_f16(raw: Array, out: Array, space: _Workspace) -> int:
    import numpy as np

    n = raw.shape[0]
    magnitude = space.get("u32", "u4")[:n]
    result = space.get("u32b", "u4")[:n]
    scratch = space.get("u32c", "u4")[:n]
    np.bitwise_and(raw, 0x7FFFFFFF, out=magnitude)
    # Normal float16 range (F. Giesen's float_to_half_fast3_rtne): rebias the exponent and
    # round to nearest even on the bits. Clamping at 65536 first sends every larger value
    # and inf to 0x7C00.
    np.minimum(magnitude, 0x47800000, out=result)
    np.right_shift(result, 13, out=scratch)
    np.bitwise_and(scratch, 1, out=scratch)
    np.add(result, scratch, out=result)
    np.add(result, 0xC8000FFF, out=result)  # (15 - 127) << 23 + 0xFFF, modulo 2**32
    np.right_shift(result, 13, out=result)
    # Below 2**-14 float16 is subnormal: adding 0.5 in float32 rounds the value to a
    # multiple of 2**-24 (nearest even) and leaves it in the low mantissa bits. Clamping
    # to [2**-25, 2**-14] keeps float32 subnormals out of the addition (slow on x86, and
    # everything up to 2**-25 rounds to 0 anyway).
    np.clip(magnitude, 0x33000000, 0x38800000, out=scratch)
    as_float = scratch.view(np.float32)
    np.add(as_float, np.float32(0.5), out=as_float)
    np.subtract(scratch, 0x3F000000, out=scratch)
    # Take those where the magnitude is below 2**-14, without branches: copyto(where=)
    # mispredicts on mixed data (4.1 ns a value on random bits, this is 0.5 ns).
    small = space.get("u32d", "u4")[:n]
    np.subtract(magnitude, 0x38800000, out=small)  # wraps, setting the top bit, if below
    np.right_shift(small, 31, out=small)
    np.negative(small, out=small)  # 1 -> all ones
    np.bitwise_xor(scratch, result, out=scratch)
    np.bitwise_and(scratch, small, out=scratch)
    np.bitwise_xor(result, scratch, out=result)
    np.right_shift(raw, 16, out=scratch)
    np.bitwise_and(scratch, 0x8000, out=scratch)
    np.bitwise_or(result, scratch, out=result)
    np.copyto(out, result, casting="unsafe")
    top = int(magnitude.max())
    if top > 0x7F800000:
        nan = magnitude > 0x7F800000
        payload = (magnitude[nan] >> 13) & 0x3FF
        out[nan] = (scratch[nan] | 0x7E00 | payload).astype(np.uint16)
    if top < 0x477FF000:  # below 65520 nothing rounds to inf
        return 0
    return int(np.count_nonzero((magnitude >= 0x477FF000) & (magnitude < 0x7F800000)))


def _cast_kernel(src: str, dst: str) -> CastKernel:
    if src == "bfloat16" and dst == "float32":
        return _cast_bf16_f32
    if src == "float32":
        return _cast_f32_bf16 if dst == "bfloat16" else _cast_f32_f16
    # The table is built here, in the caller's thread, not by the pool's workers: an
    # import in a thread (ml_dtypes) can deadlock when Ctrl-C interrupts the main thread
    # inside an import of its own.
    _cast_table(src, dst)
    return partial(_cast_table_lookup, src, dst)


def _check_cast(src: str, dst: str, name: str) -> None:
    for dtype in (src, dst):
        if dtype not in CASTABLE:
            raise OperationError(
                f"{name}: cannot cast {src} to {dst}; casts convert between "
                f"{', '.join(sorted(CASTABLE))}"
            )


def _cast_into(raw: Array, out: Array, src: str, dst: str, runner: _Runner) -> int:
    """Cast ``raw`` (``src`` bits) into ``out``; returns the float16 overflow count."""
    kernel = _cast_kernel(src, dst)

    def block(start: int, stop: int, space: _Workspace) -> int:
        return kernel(raw[start:stop], out[start:stop], space)

    return sum(runner.map(raw.shape[0], block))


def cast_bytes(data: Chunk, src: str, dst: str, *, name: str = "",
               allow_overflow: bool = False) -> bytes:
    """Convert raw little-endian ``src`` elements to ``dst``, exactly as torch's ``.to()``.

    Rounds to nearest even, bit for bit equal to ``tensor.to(dst)`` for every pair of
    float32, bfloat16 and float16 (NaN payloads included); ``src == dst`` returns the
    bytes unchanged. A finite value that becomes +-inf in float16 is an error naming
    ``name`` unless ``allow_overflow``.

    >>> cast_bytes(b"\\x80\\x3f", "bfloat16", "float16")  # 1.0
    b'\\x00<'

    The result is one more full-size copy; to cast a large tensor with less memory, use
    :func:`cast_chunks`.
    """
    import numpy as np

    _check_cast(src, dst, name)
    if src == dst:
        return bytes(data)
    raw = _raw(data, src).view(_BITS[src])
    out = np.empty(raw.shape[0], dtype=_BITS[dst])
    with _Runner(raw.shape[0]) as runner:
        overflow = _cast_into(raw, out, src, dst, runner)
    _check_overflow(overflow, name, allow_overflow)
    return out.tobytes()


CAST_HOLD = 2
"""A piece :func:`cast_chunks` yields stays valid while this many more are requested."""


class CastRing:
    """The output buffers :func:`cast_chunks` casts into, used in turn.

    Pass one ring to the streams of consecutive tensors that one consumer reads as one
    sequence (a writer that writes them on a thread of its own): the turn then carries
    on from stream to stream, so a piece stays valid while :data:`CAST_HOLD` more are
    requested, whichever stream they come from, and the buffers are faulted in once for
    the whole file (a fresh buffer per chunk: 246,000 page faults and +0.5 s of CPU for
    1 GB of bf16 -> float16).
    """

    def __init__(self) -> None:
        self._buffers: list[Array] = []
        self._turn = 0

    def next(self, size: int) -> Array:
        """The next buffer in turn, as ``size`` bytes."""
        import numpy as np

        slot = self._turn % (CAST_HOLD + 1)
        self._turn += 1
        if slot == len(self._buffers):
            self._buffers.append(np.empty(size, np.uint8))
        elif self._buffers[slot].shape[0] < size:
            self._buffers[slot] = np.empty(size, np.uint8)
        return self._buffers[slot][:size]


def cast_chunks(chunks: Iterable[Chunk], src: str, dst: str, *, name: str = "",
                allow_overflow: bool = False, ring: CastRing | None = None
                ) -> Iterator[Chunk]:
    """:func:`cast_bytes` over a stream: yields each chunk converted.

    The pieces are views of the buffers of ``ring`` (a new one by default): each stays
    valid while :data:`CAST_HOLD` more are requested from streams sharing the ring (copy
    it to keep it longer). With ``src == dst`` the chunks pass through as they are.

    Overflow is reported after the last chunk, with the count for the whole tensor, so
    write the output to a temporary file (as every paramctl rewrite does).

    >>> b"".join(cast_chunks([b"\\x80\\x3f", b"\\x00\\xc0"], "bfloat16", "float32"))
    b'\\x00\\x00\\x80?\\x00\\x00\\x00\\xc0'
    """
    _check_cast(src, dst, name)
    if src == dst:
        yield from chunks
        return
    ring = ring if ring is not None else CastRing()
    overflow = 0
    # Always pooled: a stream does not say how long it is, and the pool only splits
    # chunks of at least two blocks.
    with _Runner(_POOL_MIN) as runner:
        for chunk in chunks:
            raw = _raw(chunk, src).view(_BITS[src])
            out = ring.next(raw.shape[0] * _ITEMSIZE[dst])
            overflow += _cast_into(raw, out.view(_BITS[dst]), src, dst, runner)
            yield out.data
    _check_overflow(overflow, name, allow_overflow)


def _check_overflow(overflow: int, name: str, allow_overflow: bool) -> None:
    if overflow and not allow_overflow:
        raise OperationError(f"{name}: {overflow} {_F16_MAX_MSG}")
