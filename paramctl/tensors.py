"""The few helpers that need torch; import this module only where tensors are touched."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from paramctl.model import FLOAT_DTYPES, ParamInfo, tied_groups

if TYPE_CHECKING:
    import torch
    from torch import nn

    from paramctl.model import Edit

__all__ = [
    "Dist", "apply_edit", "dist_info", "dtype_name", "frombuffer", "module_params", "no_dist",
    "tensor_bytes", "tensor_info", "torch_dtype",
]


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


def apply_edit(model: nn.Module, edit: Edit) -> None:
    """Apply a writer :class:`~paramctl.model.Edit` to a real (non-meta) module in place."""
    import torch

    params = dict(model.named_parameters(remove_duplicate=False))
    tensors = {**dict(model.named_buffers(remove_duplicate=False)), **params}
    done: set[int] = set()
    for name in sorted(edit.init):  # the first name of a tied group seeds it, as in files
        if edit.init_fn is None:
            raise AssertionError("init without init_fn")
        if id(tensors[name]) in done:
            continue
        done.add(id(tensors[name]))
        with torch.no_grad():
            edit.init_fn(name, tensors[name].data)
    for name, flag in edit.requires_grad.items():
        params[name].requires_grad_(flag)


def no_dist() -> bool:
    import torch.distributed as tdist

    return not (tdist.is_available() and tdist.is_initialized())


@dataclass
class Dist:
    rank: int
    world: int

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as tdist

            tdist.barrier()

    def close(self) -> None:
        """Leave the torchrun group: a gloo group torn down at interpreter exit aborts the
        process ("terminate called without an active exception")."""
        if self.world > 1:
            import torch.distributed as tdist

            if tdist.is_initialized():
                tdist.barrier()
                tdist.destroy_process_group()

    def shared(self, make: Callable[[], str]) -> str:
        """Run ``make`` on rank 0 and give every rank its result."""
        if self.world == 1:
            return make()
        import torch.distributed as tdist

        box = [make() if self.rank == 0 else None]
        tdist.broadcast_object_list(box, src=0)
        return str(box[0])


def dist_info() -> Dist:
    """Join the torchrun job (gloo) when launched as one; otherwise a single process."""
    import torch.distributed as tdist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and tdist.is_available() and \
            not tdist.is_initialized():
        tdist.init_process_group("gloo")
    if tdist.is_available() and tdist.is_initialized():
        return Dist(tdist.get_rank(), tdist.get_world_size())
    return Dist(0, 1)


def tensor_info(name: str, tensor: torch.Tensor, *, trainable: bool, buffer: bool = False,
                tied: tuple[str, ...] = ()) -> ParamInfo:
    """ParamInfo for a real (or meta) tensor; only floating-point tensors can train."""
    dtype = dtype_name(tensor.dtype)
    return ParamInfo(
        name=name, shape=tuple(tensor.shape), dtype=dtype, numel=tensor.numel(),
        nbytes=tensor.numel() * tensor.element_size(),
        requires_grad=trainable and dtype in FLOAT_DTYPES, buffer=buffer, tied=tied,
    )


def module_params(module: nn.Module, *, buffers: bool) -> list[ParamInfo]:
    """ParamInfo for every parameter name (tied names included) and, optionally, buffers."""
    named = list(module.named_parameters(remove_duplicate=False))
    tied = tied_groups((name, id(p)) for name, p in named)
    out = [tensor_info(name, p, trainable=bool(p.requires_grad), tied=tied[name])
           for name, p in named]
    if buffers:
        named_b = list(module.named_buffers(remove_duplicate=False))
        tied_b = tied_groups((name, id(b)) for name, b in named_b)
        out += [tensor_info(name, b, trainable=False, buffer=True, tied=tied_b[name])
                for name, b in named_b]
    return out
