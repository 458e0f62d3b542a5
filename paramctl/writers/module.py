"""Write a module-path source (an ``nn.Module`` built from code) to a checkpoint file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from paramctl.errors import UsageError
from paramctl.io.files import atomic_write
from paramctl.model import Edit

if TYPE_CHECKING:
    from torch import nn

__all__ = ["rewrite", "save_module"]


class ModuleLike(Protocol):
    spec: str

    def module(self, *, meta: bool = True) -> nn.Module: ...


def rewrite(source: ModuleLike, edit: Edit, out: Path | None) -> Path:
    """Build the module with real weights, apply ``edit`` and save it to ``out``."""
    from paramctl.tensors import apply_edit

    if out is None:
        raise UsageError(f"{source.spec} is a module path; name the checkpoint to write "
                         "with -o OUT.pt or -o OUT.safetensors")
    module = source.module(meta=False)
    apply_edit(module, edit)
    return save_module(module, out)


def save_module(model: nn.Module, out: Path) -> Path:
    """Save ``model``'s parameters and buffers with their frozen state, atomically.

    ``.safetensors`` records frozen names in ``__metadata__["paramctl.frozen"]`` and keeps
    one name per tied group (as Hugging Face does); other extensions get a torch zip whose
    frozen entries are ``nn.Parameter(requires_grad=False)``.
    """
    import torch

    state: dict[str, torch.Tensor] = {}
    frozen: list[str] = []
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    params = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not isinstance(tensor, torch.Tensor):
            continue
        p = params.get(name)
        if p is not None and not p.requires_grad and (p.is_floating_point() or p.is_complex()):
            frozen.append(name)
            state[name] = torch.nn.Parameter(p.detach(), requires_grad=False)
        else:
            state[name] = tensor.detach()
    if out.suffix == ".safetensors":
        import json

        from safetensors.torch import save as st_save

        flat: dict[str, torch.Tensor] = {}
        for name, t in state.items():
            key = (t.untyped_storage().data_ptr(), int(t.storage_offset()), tuple(t.shape))
            if t.numel() and key in seen:
                continue  # a tied name: safetensors keeps one copy
            seen.add(key)
            flat[name] = t.detach().contiguous()
        meta = {"format": "pt"}
        kept = [n for n in frozen if n in flat]
        if kept:
            meta["paramctl.frozen"] = json.dumps(sorted(kept))
        data = st_save(flat, metadata=meta)
        with atomic_write(out) as fh:
            fh.write(data)
        return out
    with atomic_write(out) as fh:
        torch.save(state, fh)
    return out
