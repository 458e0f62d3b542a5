"""The few helpers that need torch; import this module only where tensors are touched."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["dtype_name", "frombuffer", "tensor_bytes", "torch_dtype"]


def torch_dtype(name: str) -> torch.dtype:
    import torch

    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {name}")
    return value


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def frombuffer(buf: bytearray, dtype: str) -> torch.Tensor:
    """A writable 1-D tensor over ``buf`` (no copy)."""
    import warnings

    import torch

    if not buf:
        return torch.empty(0, dtype=torch_dtype(dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = torch.frombuffer(buf, dtype=torch.uint8)
    return raw.view(torch_dtype(dtype))


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's elements in row-major order as raw bytes (one copy)."""
    import torch

    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
