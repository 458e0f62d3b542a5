"""paramctl.numeric against real torch: statistics, diff metrics and casts.

torch is the oracle throughout: statistics and diffs are compared with torch computing on
``t.double()`` over the finite values, casts byte for byte with ``tensor.to(dtype)``.
Most tests run twice (the ``mode`` fixture): as a small tensor is processed (one thread,
64 Ki-value blocks) and as a large one is (a thread pool, with tiny blocks so that many
block boundaries, chunk boundaries and pool splits fall inside small test tensors).
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paramctl import numeric
from paramctl.errors import OperationError
from paramctl.numeric import (
    CAST_HOLD,
    CASTABLE,
    DECODABLE,
    DiffMetrics,
    TensorStats,
    cast_bytes,
    cast_chunks,
    chunk_bytes,
    diff_metrics,
    tensor_stats,
)

REPO = Path(__file__).resolve().parent.parent

# torch's own float64 std (Welford, merged across threads) is off from exact rational
# arithmetic by up to ~3e-12 relative on a few million values (paramctl's is within 1e-15
# of it: test_stats_are_exact_for_dyadic_values), so std against torch gets that slack.
# Sums (mean, l2) are pairwise or fsum on both sides: 1e-12.
REL = 1e-12
STD_REL = 1e-11

ALL_16_BIT = np.arange(1 << 16, dtype=np.uint32).astype("<u2").tobytes()

HYPOTHESIS = settings(max_examples=40, deadline=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(params=["serial", "pooled"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """``pooled``: every tensor goes through a 3-worker pool, in blocks of 1,000 values."""
    if request.param == "pooled":
        monkeypatch.setattr(numeric, "_BLOCK", 1000)
        monkeypatch.setattr(numeric, "_POOL_MIN", 0)
        monkeypatch.setattr(numeric, "_workers", lambda: 3)
    return str(request.param)


# -- helpers ---------------------------------------------------------------------------------

def dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name)
    assert isinstance(dtype, torch.dtype)
    return dtype


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def from_raw(data: bytes, name: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype_of(name))


def split(data: bytes, itemsize: int, elements: Sequence[int]) -> list[bytes]:
    """``data`` cut into chunks of the given element counts (the rest in a last chunk)."""
    chunks, pos = [], 0
    for n in elements:
        chunks.append(data[pos:pos + n * itemsize])
        pos += n * itemsize
    return [*chunks, data[pos:]]


def fixed_chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The tensor's storage as signed integers of the same width (for writing bit patterns)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[
        t.element_size()])


def sample(name: str, n: int, seed: int) -> torch.Tensor:
    """``n`` values of dtype ``name``: the whole range, with NaN, +-Inf and zeros mixed in."""
    gen = torch.Generator().manual_seed(seed)
    dtype = dtype_of(name)
    if name == "bool":
        return torch.rand(n, generator=gen) < 0.3
    size = torch.tensor([], dtype=dtype).element_size()
    if size <= 2 or not dtype.is_floating_point:
        # Random bit patterns: every exponent (subnormals, NaN payloads...) or the full
        # integer range.
        t = torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=gen).view(dtype)
    else:
        t = (torch.randn(n, generator=gen, dtype=torch.float64) * 3 + 1).to(dtype)
    if dtype.is_floating_point:
        specials = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0])
        positions = torch.randint(0, n, (max(1, n // 50),), generator=gen)
        picks = specials[torch.randint(0, len(specials), (len(positions),), generator=gen)]
        # float8 formats without inf turn it into NaN or their max: whatever torch
        # stores is the data.
        bits_of(t)[positions] = bits_of(picks.to(dtype))
    return t


def torch_stats(t: torch.Tensor) -> TensorStats:
    """The oracle: torch float64 over the finite values."""
    x = t.reshape(-1).double()
    finite = x[torch.isfinite(x)]
    counts = int((x == 0).sum()), int(x.isnan().sum()), int(x.isinf().sum())
    if finite.numel() == 0:
        return TensorStats(x.numel(), None, None, None, None, None, *counts)
    return TensorStats(
        x.numel(), finite.min().item(), finite.max().item(), finite.mean().item(),
        finite.std(correction=0).item(), torch.linalg.vector_norm(finite).item(), *counts)


def assert_stats(actual: TensorStats, expected: TensorStats, std_rel: float = STD_REL) -> None:
    assert (actual.numel, actual.zeros, actual.nan, actual.inf) == (
        expected.numel, expected.zeros, expected.nan, expected.inf)
    assert (actual.min, actual.max) == (expected.min, expected.max)
    if expected.mean is None:
        assert (actual.mean, actual.std, actual.l2) == (None, None, None)
        return
    assert expected.min is not None and expected.max is not None
    # The mean's rounding error is relative to the values summed, not to a mean that
    # cancels to nearly 0; hence an absolute floor from the largest magnitude.
    scale = max(abs(expected.min), abs(expected.max))
    assert actual.mean == pytest.approx(expected.mean, rel=REL, abs=REL * scale)
    assert actual.std == pytest.approx(expected.std, rel=std_rel)
    assert actual.l2 == pytest.approx(expected.l2, rel=REL)


def torch_diff(a: torch.Tensor, b: torch.Tensor) -> DiffMetrics:
    """The oracle: torch float64 over the positions where both sides are finite."""
    x, y = a.reshape(-1).double(), b.reshape(-1).double()
    both = torch.isfinite(x) & torch.isfinite(y)
    x, y = x[both], y[both]
    if x.numel() == 0:
        return DiffMetrics(None, None, None)
    norm_a, norm_b = torch.linalg.vector_norm(x).item(), torch.linalg.vector_norm(y).item()
    rel = torch.linalg.vector_norm(x - y).item() / norm_a if norm_a else None
    cosine = torch.dot(x, y).item() / (norm_a * norm_b) if norm_a and norm_b else None
    return DiffMetrics((x - y).abs().max().item(), rel, cosine)


def assert_diff(actual: DiffMetrics, expected: DiffMetrics) -> None:
    assert actual.max_abs == expected.max_abs
    for got, want in ((actual.rel_l2, expected.rel_l2), (actual.cosine, expected.cosine)):
        if want is None:
            assert got is None
        else:
            # cosine near 0 cancels: absolute floor, as for the mean
            assert got == pytest.approx(want, rel=REL, abs=REL)


def torch_cast(data: bytes, src: str, dst: str) -> bytes:
    return raw(from_raw(data, src).to(dtype_of(dst)))


# -- tensor_stats ----------------------------------------------------------------------------

def test_decodable_covers_the_documented_dtypes() -> None:
    documented = {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
                  "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                  "bool", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"}
    assert documented == DECODABLE
    for name in DECODABLE:  # every one is a real torch dtype
        dtype_of(name)


@pytest.mark.parametrize("name", sorted(DECODABLE))
def test_stats_match_torch_for_every_dtype(name: str, mode: str) -> None:
    t = sample(name, 20_011, seed=len(name))
    assert_stats(tensor_stats(fixed_chunks(raw(t), chunk_bytes(name) // 64), name, t.numel()),
                 torch_stats(t))


@pytest.mark.parametrize("name", ["bfloat16", "float32"])
def test_stats_of_a_tensor_large_enough_for_the_pool(name: str) -> None:
    # Real block size and pool threshold (no monkeypatching): 2.5 M values.
    t = sample(name, numeric._POOL_MIN + 400_001, seed=7)
    assert_stats(tensor_stats(fixed_chunks(raw(t), chunk_bytes(name)), name, t.numel()),
                 torch_stats(t))


def test_every_bit_pattern_of_the_small_float_dtypes(mode: str) -> None:
    for name in sorted(DECODABLE):
        dtype = dtype_of(name)
        if not dtype.is_floating_point or dtype.itemsize > 2:
            continue
        data = ALL_16_BIT if dtype.itemsize == 2 else bytes(range(256))
        tensor = from_raw(data, name)
        assert_stats(tensor_stats([data], name, tensor.numel()), torch_stats(tensor))


def test_stats_are_exact_for_dyadic_values(mode: str) -> None:
    # Exact rational arithmetic as the oracle: bf16 values are dyadic rationals. Values
    # like a layer's weights (random bit patterns span 1e-40..3e38 and cancel down to
    # nothing, so only an error relative to the largest value would make sense there).
    gen = torch.Generator().manual_seed(3)
    t = (torch.randn(30_000, generator=gen) * 2 + 0.5).to(torch.bfloat16)
    t[::97] = math.nan
    t[::101] = -math.inf
    values, counts = np.unique(t.double().numpy(), return_counts=True)
    finite = np.isfinite(values)
    pairs = [(Fraction(float(v)), int(c)) for v, c in zip(values[finite], counts[finite],
                                                           strict=True)]
    n = sum(c for _, c in pairs)
    mean = sum(v * c for v, c in pairs) / n
    var = sum((v - mean) ** 2 * c for v, c in pairs) / n
    squares = sum(v * v * c for v, c in pairs)
    stats = tensor_stats([raw(t)], "bfloat16", t.numel())
    assert stats.mean == pytest.approx(float(mean), rel=1e-15)
    assert stats.std == pytest.approx(math.sqrt(var), rel=1e-15)
    assert stats.l2 == pytest.approx(math.sqrt(squares), rel=1e-15)


@pytest.mark.parametrize("shift", [1e4, 1e8])
def test_std_is_accurate_when_the_mean_dwarfs_it(shift: float, mode: str) -> None:
    # float64 values 1e8 + N(0, 1): sum-of-squares formulas lose every digit here.
    # The exact oracle: every value is an integer multiple of one power of two.
    x = shift + np.random.default_rng(1).standard_normal(50_000)
    exponent = math.frexp(float(x.max()))[1] - 53
    ints = [int(v) for v in np.ldexp(x, -exponent)]
    n, total, squares = len(ints), sum(ints), sum(i * i for i in ints)
    std = math.sqrt(Fraction(n * squares - total * total, n * n)) * 2.0**exponent
    stats = tensor_stats(fixed_chunks(x.tobytes(), 8 * 4999), "float64", n)
    assert stats.std == pytest.approx(std, rel=1e-14)
    assert stats.mean == pytest.approx(float(Fraction(total, n)) * 2.0**exponent, rel=1e-15)
    assert stats.std == pytest.approx(torch.from_numpy(x).std(correction=0).item(), rel=1e-13)


@pytest.mark.parametrize("value", [0.1, -3.0, 0.0])
def test_a_constant_tensor_has_no_spread(value: float, mode: str) -> None:
    t = torch.full((70_001,), value, dtype=torch.bfloat16)
    stored = t[0].item()
    stats = tensor_stats([raw(t)], "bfloat16", t.numel())
    assert (stats.min, stats.max, stats.mean, stats.std) == (stored, stored, stored, 0.0)
    assert stats.l2 == pytest.approx(abs(stored) * math.sqrt(70_001), rel=REL)


def test_empty_tensor_has_no_values() -> None:
    empty = TensorStats(0, None, None, None, None, None, 0, 0, 0)
    assert tensor_stats([], "bfloat16", 0) == empty
    assert tensor_stats([b""], "float32", 0) == empty


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16", "float64"])
def test_a_tensor_without_finite_values(name: str, mode: str) -> None:
    t = torch.tensor([math.nan, math.inf, -math.inf, math.nan] * 700, dtype=dtype_of(name))
    stats = tensor_stats([raw(t)], name, t.numel())
    assert stats == TensorStats(2800, None, None, None, None, None, 0, 1400, 1400)


def test_bool_counts_as_zero_and_one(mode: str) -> None:
    t = torch.tensor([True, False, True, True] * 1000)
    stats = tensor_stats([raw(t)], "bool", t.numel())
    assert stats == TensorStats(4000, 0.0, 1.0, 0.75, math.sqrt(0.75 * 0.25),
                                math.sqrt(3000), 1000, 0, 0)
    # A byte other than 0/1 in a bool tensor is still true.
    assert tensor_stats([b"\x00\x02"], "bool", 2).max == 1.0


@pytest.mark.parametrize("name", ["int64", "uint64", "int32", "uint32", "int16", "int8"])
def test_integer_extremes(name: str, mode: str) -> None:
    dtype = dtype_of(name)
    info = torch.iinfo(dtype)
    t = torch.tensor([info.min, info.max, 0, info.max, 1], dtype=dtype).repeat(1001)
    assert_stats(tensor_stats([raw(t)], name, t.numel()), torch_stats(t))


@given(cuts=st.lists(st.integers(0, 600), max_size=12))
@HYPOTHESIS
def test_any_chunk_split_gives_the_same_stats(cuts: list[int], mode: str) -> None:
    # Chunks of single elements, primes, empty chunks: the split must not matter.
    t = sample("float16", 3001, seed=11)
    expected = torch_stats(t)
    assert_stats(tensor_stats(split(raw(t), 2, cuts), "float16", 3001), expected)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 13, 1009])
def test_fixed_odd_chunk_sizes(size: int, mode: str) -> None:
    t = sample("float32", 4003, seed=size)
    assert_stats(tensor_stats(fixed_chunks(raw(t), 4 * size), "float32", t.numel()),
                 torch_stats(t))


def test_a_reused_chunk_buffer_is_safe(mode: str) -> None:
    # Sources may read every chunk into the same buffer: each chunk must be finished
    # before the next is requested, threads or not.
    t = sample("bfloat16", 50_000, seed=5)
    data = raw(t)

    def reusing() -> Iterator[memoryview]:
        buffer = bytearray(7002)
        for start in range(0, len(data), len(buffer)):
            piece = data[start:start + len(buffer)]
            buffer[: len(piece)] = piece
            yield memoryview(buffer)[: len(piece)]

    assert_stats(tensor_stats(reusing(), "bfloat16", t.numel()), torch_stats(t))


def test_truncated_or_overlong_data_is_an_error() -> None:
    data = raw(torch.ones(10, dtype=torch.float32))
    with pytest.raises(OperationError, match="truncated"):
        tensor_stats([data[:36]], "float32", 10)
    with pytest.raises(OperationError, match="truncated"):
        tensor_stats([data, data[:4]], "float32", 10)
    with pytest.raises(OperationError, match="whole float32 elements"):
        tensor_stats([data[:6], data[6:]], "float32", 10)


@pytest.mark.parametrize("name", ["complex64", "Q4_K", "float4_e2m1fn_x2"])
def test_an_undecodable_dtype_is_named(name: str) -> None:
    with pytest.raises(OperationError, match=f"cannot decode dtype '{name}'"):
        tensor_stats([b"\x00" * 8], name, 1)
    with pytest.raises(OperationError, match=name):
        diff_metrics([b""], "float32", [b""], name, 0)
    with pytest.raises(OperationError, match=name):
        chunk_bytes(name)


@pytest.mark.parametrize("name", sorted(DECODABLE))
def test_chunk_bytes_holds_whole_elements(name: str) -> None:
    size = chunk_bytes(name)
    assert size % dtype_of(name).itemsize == 0
    assert 1 << 20 <= size <= 64 << 20


def test_importing_the_module_imports_neither_torch_nor_numpy() -> None:
    code = ("import sys, paramctl.numeric as n\n"
            "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))\n"
            "n.tensor_stats([b'\\x80\\x3f'], 'bfloat16', 1)\n"
            "n.cast_bytes(b'\\x80\\x3f', 'bfloat16', 'float16')\n"
            "print('torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, env={"PYTHONPATH": str(REPO)}, check=True)
    assert done.stdout.split() == ["[]", "False"]


# -- diff_metrics ----------------------------------------------------------------------------

@pytest.mark.parametrize(("name_a", "name_b"), [
    ("bfloat16", "bfloat16"), ("bfloat16", "float32"), ("float16", "float64"),
    ("float8_e4m3fn", "bfloat16"), ("int64", "float32"), ("uint8", "bool"),
])
def test_diff_matches_torch(name_a: str, name_b: str, mode: str) -> None:
    a = sample(name_a, 30_007, seed=1)
    noise = sample("float32", 30_007, seed=2).double()
    b = (a.double() + noise * 0.01).to(dtype_of(name_b))
    metrics = diff_metrics(fixed_chunks(raw(a), 4096 * a.element_size()), name_a,
                           fixed_chunks(raw(b), 3000 * b.element_size()), name_b, 30_007)
    assert_diff(metrics, torch_diff(a, b))


def test_diff_of_a_large_tensor_through_the_pool() -> None:
    a = sample("bfloat16", numeric._POOL_MIN + 100_003, seed=4)
    b = (a.float() * 1.01).to(torch.bfloat16)
    metrics = diff_metrics(fixed_chunks(raw(a), chunk_bytes("bfloat16")), "bfloat16",
                           fixed_chunks(raw(b), 3 << 20), "bfloat16", a.numel())
    assert_diff(metrics, torch_diff(a, b))


@given(cuts_a=st.lists(st.integers(0, 400), max_size=8),
       cuts_b=st.lists(st.integers(0, 400), max_size=8))
@HYPOTHESIS
def test_diff_realigns_any_chunk_sizes(cuts_a: list[int], cuts_b: list[int],
                                       mode: str) -> None:
    a = sample("bfloat16", 2003, seed=8)
    b = sample("float32", 2003, seed=9)
    metrics = diff_metrics(split(raw(a), 2, cuts_a), "bfloat16",
                           split(raw(b), 4, cuts_b), "float32", 2003)
    assert_diff(metrics, torch_diff(a, b))


def test_identical_tensors(mode: str) -> None:
    t = sample("float32", 5000, seed=12)
    assert diff_metrics([raw(t)], "float32", [raw(t)], "float32", 5000) == DiffMetrics(
        0.0, 0.0, 1.0)


def test_zero_norms_give_none(mode: str) -> None:
    zeros = raw(torch.zeros(3000))
    values = torch.arange(3000, dtype=torch.float32) - 1000.5
    # ||a|| = 0: no relative error, no angle; max |a-b| is still defined
    assert diff_metrics([zeros], "float32", [raw(values)], "float32", 3000) == DiffMetrics(
        1998.5, None, None)
    # ||b|| = 0: the relative error is 1, the angle undefined
    assert diff_metrics([raw(values)], "float32", [zeros], "float32", 3000) == DiffMetrics(
        1998.5, 1.0, None)


def test_diff_without_comparable_positions(mode: str) -> None:
    assert diff_metrics([], "float32", [], "bfloat16", 0) == DiffMetrics(None, None, None)
    a = torch.tensor([math.nan, 1.0] * 1000)
    b = torch.tensor([2.0, math.inf] * 1000)
    assert diff_metrics([raw(a)], "float32", [raw(b)], "float32", 2000) == DiffMetrics(
        None, None, None)


def test_diff_of_mismatched_lengths_is_an_error() -> None:
    a, b = raw(torch.ones(10)), raw(torch.ones(10, dtype=torch.float64))
    with pytest.raises(OperationError, match="float64 data of 10 elements"):
        diff_metrics([a], "float32", [b[:72]], "float64", 10)
    with pytest.raises(OperationError, match="float32 data of 10 elements"):
        diff_metrics([a, a[:4]], "float32", [b], "float64", 10)


# -- cast_bytes ------------------------------------------------------------------------------

@pytest.mark.parametrize(("src", "dst"), [
    ("bfloat16", "float16"), ("float16", "bfloat16"), ("bfloat16", "float32"),
    ("float16", "float32"),
])
def test_every_16_bit_pattern_casts_as_torch_does(src: str, dst: str, mode: str) -> None:
    assert cast_bytes(ALL_16_BIT, src, dst, allow_overflow=True) == torch_cast(
        ALL_16_BIT, src, dst)


@cache
def float32_patterns() -> bytes:
    """5 M random float32 bit patterns (every exponent, subnormals, NaN payloads) plus 5 M
    in float16's range, every tie between neighbouring bfloat16 and float16 values (and
    one ulp either side), and the special values."""
    rng = np.random.default_rng(0)
    anything = rng.integers(0, 1 << 32, 5_000_000, dtype=np.uint64).astype(np.uint32)
    exponents = rng.integers(95, 145, 5_000_000, dtype=np.uint32) << 23
    in_range = exponents | rng.integers(0, 1 << 23, 5_000_000, dtype=np.uint32) | (
        rng.integers(0, 2, 5_000_000, dtype=np.uint32) << 31)
    bf16_ties = (np.arange(1 << 16, dtype=np.uint32) << 16) | 0x8000
    f16 = np.arange(1 << 15, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = f16[np.isfinite(f16)].astype(np.float64)
    f16_ties = ((finite[:-1] + finite[1:]) / 2).astype(np.float32).view(np.uint32)
    ties = np.concatenate([bf16_ties, f16_ties, f16_ties | 0x80000000])
    specials = np.array([
        0, 0x80000000, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF, 1, 0x80000001,
        0x00800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x7FBFFFFF,
        0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FF001, 0x47800000,  # around 65504..65520
        0x33000000, 0x33000001, 0x33800000, 0x387FF000, 0x387FFFFF, 0x38800000,  # 2**-25..
    ], dtype=np.uint32)
    return np.concatenate([anything, in_range, ties, ties - 1, ties + 1, specials]).astype(
        "<u4").tobytes()


@pytest.mark.parametrize("dst", ["bfloat16", "float16"])
def test_float32_bit_patterns_cast_as_torch_does(dst: str) -> None:
    data = float32_patterns()
    assert cast_bytes(data, "float32", dst, allow_overflow=True) == torch_cast(
        data, "float32", dst)


@pytest.mark.parametrize("dst", ["bfloat16", "float16"])
def test_float32_casts_through_the_pool(dst: str, mode: str) -> None:
    data = float32_patterns()[: 4 * 200_003]
    assert cast_bytes(data, "float32", dst, allow_overflow=True) == torch_cast(
        data, "float32", dst)


@pytest.mark.parametrize("name", sorted(CASTABLE))
def test_casting_to_the_same_dtype_changes_nothing(name: str) -> None:
    data = float32_patterns()[:40_000] if name == "float32" else ALL_16_BIT
    assert cast_bytes(memoryview(data), name, name) == data


@pytest.mark.parametrize(("src", "values", "overflowing"), [
    ("float32", [1e5, 1.0, -7e4, math.inf, math.nan, 65504.0, 65519.99, -65520.0], 3),
    ("bfloat16", [7e4, -3e38, 65280.0, -math.inf, 1.0], 2),
])
def test_float16_overflow_is_an_error_naming_the_tensor(src: str, values: list[float],
                                                        overflowing: int, mode: str) -> None:
    data = raw(torch.tensor(values * 300).to(dtype_of(src)))
    message = (f"w.q: {overflowing * 300} values overflow float16 (max 65504); "
               "pass --allow-overflow to turn them into inf")
    with pytest.raises(OperationError) as error:
        cast_bytes(data, src, "float16", name="w.q")
    assert str(error.value) == message
    # allowed, they become inf exactly as torch makes them
    assert cast_bytes(data, src, "float16", name="w.q", allow_overflow=True) == torch_cast(
        data, src, "float16")
    # only float16 overflows
    cast_bytes(data, src, "float32" if src == "bfloat16" else "bfloat16", name="w.q")


@pytest.mark.parametrize(("src", "dst"), [("int8", "float16"), ("bool", "bfloat16"),
                                          ("float32", "int32"), ("float64", "float32")])
def test_only_float32_bfloat16_and_float16_cast(src: str, dst: str) -> None:
    with pytest.raises(OperationError, match=f"w: cannot cast {src} to {dst}"):
        cast_bytes(b"\x00" * 8, src, dst, name="w")


def test_a_partial_element_is_an_error() -> None:
    with pytest.raises(OperationError, match="whole float32 elements"):
        cast_bytes(b"\x00" * 6, "float32", "bfloat16")


@given(cuts=st.lists(st.integers(0, 9000), max_size=6),
       pair=st.sampled_from([("bfloat16", "float16"), ("float32", "float16"),
                             ("float16", "float32"), ("float32", "bfloat16")]))
@HYPOTHESIS
def test_cast_chunks_equals_cast_bytes(cuts: list[int], pair: tuple[str, str],
                                       mode: str) -> None:
    src, dst = pair
    data = float32_patterns()[:80_000] if src == "float32" else ALL_16_BIT[:80_000]
    size = dtype_of(src).itemsize
    pieces = [bytes(p) for p in cast_chunks(split(data, size, cuts), src, dst,
                                            allow_overflow=True)]
    assert b"".join(pieces) == cast_bytes(data, src, dst, allow_overflow=True)


def assert_held_pieces_stay_valid(pieces: Iterable[Any], expected: bytes) -> None:
    """Each piece still holds its bytes while CAST_HOLD more are asked for."""
    held: list[tuple[int, memoryview]] = []
    pos = 0
    for piece in pieces:
        view = memoryview(piece)
        held.append((pos, view))
        pos += len(view)
        for start, old in held[-(CAST_HOLD + 1):]:
            assert bytes(old) == expected[start:start + len(old)]
    assert pos == len(expected)


def test_cast_chunks_pieces_stay_valid_for_cast_hold_more(mode: str) -> None:
    # A consumer (a background writer) may hold CAST_HOLD pieces while asking for more.
    data = ALL_16_BIT
    expected = cast_bytes(data, "bfloat16", "float16", allow_overflow=True)
    stream = cast_chunks(fixed_chunks(data, 4096), "bfloat16", "float16", allow_overflow=True)
    assert_held_pieces_stay_valid(stream, expected)


def test_cast_chunks_reports_overflow_after_the_last_chunk(mode: str) -> None:
    data = raw(torch.tensor([1e5, 1.0] * 3000))
    stream = cast_chunks(fixed_chunks(data, 4000), "float32", "float16", name="emb")
    produced = [bytes(next(stream)) for _ in range(6)]  # every chunk comes out first
    assert len(b"".join(produced)) == len(data) // 2
    with pytest.raises(OperationError, match=r"^emb: 3000 values overflow float16"):
        next(stream)


def test_a_shared_ring_keeps_pieces_valid_across_streams(mode: str) -> None:
    # A writer reads the casts of consecutive tensors as one sequence and may hold
    # CAST_HOLD pieces across the end of one tensor's stream: the next stream must not
    # reuse those buffers (a shared ring carries its turn on).
    from itertools import chain

    from paramctl.numeric import CastRing

    tensors = [ALL_16_BIT[i * 8192:(i + 1) * 8192 + 2 * i] for i in range(5)]
    expected = b"".join(cast_bytes(t, "bfloat16", "float16", allow_overflow=True)
                        for t in tensors)
    ring = CastRing()
    streams = chain.from_iterable(
        cast_chunks(fixed_chunks(t, 3000), "bfloat16", "float16", allow_overflow=True,
                    ring=ring) for t in tensors)
    assert_held_pieces_stay_valid(streams, expected)
