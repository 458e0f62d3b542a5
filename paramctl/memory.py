"""What training will cost: a static memory estimate over a listing's ``ParamInfo`` records.

Pure arithmetic (no torch, no printing), following DESIGN.md's "mem" table. Activations are
not included: they depend on batch size and sequence length, which a checkpoint does not
record.

>>> from paramctl.model import ParamInfo
>>> w = ParamInfo("w", (1000,), "float32", 1000, 4000, requires_grad=True)
>>> estimate([w]).bytes.total  # fp32 weights + fp32 gradients + AdamW's two fp32 moments
16000
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from paramctl.errors import UsageError
from paramctl.model import FLOAT_DTYPES, ParamInfo, totals

__all__ = ["OPTIMIZERS", "PRECISIONS", "MemBytes", "MemEstimate", "estimate", "validate"]

OPTIMIZERS = ("adamw", "adam", "sgd", "sgd-momentum", "lion", "adamw-8bit", "adafactor")
PRECISIONS = ("fp32", "bf16", "fp16", "bf16-mixed", "fp16-mixed")
ZERO_STAGES = (0, 1, 2, 3)

# Bytes per parameter: weights (every floating-point parameter), then gradients and the
# fp32 master copy (trainable parameters only).
_PRECISION_BYTES: dict[str, tuple[int, int, int]] = {
    "fp32": (4, 4, 0),
    "bf16": (2, 2, 0),
    "fp16": (2, 2, 0),
    "bf16-mixed": (2, 2, 4),
    "fp16-mixed": (2, 2, 4),
}

# Optimizer state per trainable parameter, in bytes (fp32 states; adamw-8bit keeps two
# one-byte moments). Adafactor is not a constant: see _adafactor_bytes.
_OPTIMIZER_BYTES: dict[str, int] = {
    "adamw": 8,
    "adam": 8,
    "sgd": 0,
    "sgd-momentum": 4,
    "lion": 4,
    "adamw-8bit": 2,
}


@dataclass(frozen=True)
class MemBytes:
    """Bytes per component; ``total`` is their sum."""

    weights: int
    gradients: int
    master: int
    optimizer: int
    total: int

    def to_json(self) -> dict[str, int]:
        return {"weights": self.weights, "gradients": self.gradients, "master": self.master,
                "optimizer": self.optimizer, "total": self.total}


@dataclass(frozen=True)
class MemEstimate:
    """The estimate for one model, precision, optimizer and device split.

    ``bytes`` is the whole run; ``per_device`` what one of ``shards`` devices holds under
    ZeRO stage ``zero`` (equal to ``bytes`` on one device or with stage 0). The parameter
    counts are those of ``paramctl list``'s totals: ``params_total`` counts every tensor
    element (buffers and integer tensors included), tied tensors once.
    """

    source: str
    precision: str
    optimizer: str
    shards: int
    zero: int
    params_total: int
    params_trainable: int
    params_frozen: int
    bytes: MemBytes
    per_device: MemBytes

    def to_json(self) -> dict[str, Any]:
        """The stable JSON document of ``paramctl mem -f json`` (DESIGN.md)."""
        return {
            "source": self.source,
            "precision": self.precision,
            "optimizer": self.optimizer,
            "shards": self.shards,
            "zero": self.zero,
            "params": {"total": self.params_total, "trainable": self.params_trainable,
                       "frozen": self.params_frozen},
            "bytes": self.bytes.to_json(),
            "per_device": self.per_device.to_json(),
        }


def validate(optimizer: str, precision: str, shards: int, zero: int) -> tuple[str, str]:
    """Check the choices before any source is opened; return the optimizer and precision
    names in canonical (lower) case. Raises :class:`UsageError` naming the valid ones."""
    opt, prec = optimizer.lower(), precision.lower()
    if opt not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {optimizer!r}; choose one of "
                         f"{', '.join(OPTIMIZERS)}")
    if prec not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose one of "
                         f"{', '.join(PRECISIONS)}")
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise UsageError(f"shards must be a number of devices, 1 or more (got {shards!r})")
    if isinstance(zero, bool) or zero not in ZERO_STAGES:
        raise UsageError(f"unknown ZeRO stage {zero!r}; choose one of "
                         f"{', '.join(map(str, ZERO_STAGES))}")
    return opt, prec


def _adafactor_bytes(shape: tuple[int, ...], numel: int) -> int:
    """Factored second moment: a row and a column vector per matrix (per leading index)."""
    if len(shape) < 2:
        return 4 * numel
    rows, cols = shape[-2], shape[-1]
    return 4 * (rows + cols) * math.prod(shape[:-2])


def _split(n: int, shards: int) -> int:
    return -(-n // shards)  # ceil: the largest share when n does not divide evenly


def estimate(params: Sequence[ParamInfo], *, source: str = "", optimizer: str = "adamw",
             precision: str = "fp32", shards: int = 1, zero: int = 0) -> MemEstimate:
    """Memory a training run needs for ``params`` with their current ``requires_grad``.

    Floating-point parameters count at ``precision``'s bytes (weights for all, gradients
    and master copy for trainable ones) plus ``optimizer`` state when trainable; buffers and
    non-floating tensors count at their stored size, in weights only. Tied tensors count
    once. With ``shards > 1``, ZeRO stage 1 divides optimizer state and master copy across
    the devices, stage 2 also gradients, stage 3 also the parameters' weights (buffers and
    non-floating tensors stay replicated, as FSDP and DeepSpeed keep them); each divided
    component is rounded up (ceil division), and ``per_device.total`` sums the rounded
    components.

    >>> est = estimate(params, optimizer="adamw", precision="bf16-mixed")  # doctest: +SKIP
    """
    opt, prec = validate(optimizer, precision, shards, zero)
    weight_b, grad_b, master_b = _PRECISION_BYTES[prec]
    param_weights = stored = gradients = master = state = 0
    seen: set[str] = set()
    for p in params:
        # a tied group counts once, by its first listed member (as paramctl.model.totals)
        first = not (p.tied and any(t in seen for t in p.tied))
        seen.add(p.name)
        if not first:
            continue
        if p.buffer or p.dtype not in FLOAT_DTYPES:
            stored += p.nbytes
            continue
        param_weights += weight_b * p.numel
        if p.requires_grad:
            gradients += grad_b * p.numel
            master += master_b * p.numel
            state += (_adafactor_bytes(p.shape, p.numel) if opt == "adafactor"
                      else _OPTIMIZER_BYTES[opt] * p.numel)
    whole = MemBytes(param_weights + stored, gradients, master, state,
                     param_weights + stored + gradients + master + state)
    n = shards if shards > 1 else 1
    stage = zero if n > 1 else 0
    dev_state = _split(state, n) if stage >= 1 else state
    dev_master = _split(master, n) if stage >= 1 else master
    dev_grads = _split(gradients, n) if stage >= 2 else gradients
    dev_weights = (_split(param_weights, n) if stage >= 3 else param_weights) + stored
    per_device = MemBytes(dev_weights, dev_grads, dev_master, dev_state,
                          dev_weights + dev_grads + dev_master + dev_state)
    t = totals(params)
    return MemEstimate(source, prec, opt, shards, zero, t.numel, t.trainable, t.frozen,
                       whole, per_device)
