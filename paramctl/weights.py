"""Loading a checkpoint's weights *and* frozen flags into a real module."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from paramctl.errors import SourceError
from paramctl.model import FLOAT_DTYPES, tied_groups
from paramctl.sources import open_source
from paramctl.sources.base import OpenOptions, Source

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["LoadResult", "describe_mismatch", "frozen_names", "load_state_dict", "tied_names"]


class LoadResult(NamedTuple):
    """Like torch's ``_IncompatibleKeys``: what the model lacked and what the file lacked."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _file_source(path: str | os.PathLike[str], key: str | None = None) -> Any:
    source = open_source(os.fspath(path), OpenOptions(key=key))
    if not hasattr(source, "load_tensors"):
        raise SourceError(f"{path} is not a checkpoint file paramctl can load tensors from")
    return source


def _frozen(source: Source) -> list[str]:
    return [p.name for p in source.params()
            if not p.requires_grad and p.dtype in FLOAT_DTYPES and not p.buffer]


def frozen_names(path: str | os.PathLike[str], *, key: str | None = None) -> list[str]:
    """Names the checkpoint records as frozen (read from metadata; no tensor data).

    >>> frozen_names("ckpt.pt")  # doctest: +SKIP
    ['backbone.0.weight', 'backbone.0.bias']
    """
    return _frozen(open_source(os.fspath(path), OpenOptions(key=key)))


def describe_mismatch(missing: Sequence[str], unexpected: Sequence[str]) -> str:
    """``missing from the file: a, b; not in the model: c`` (first five of each)."""
    parts = []
    if missing:
        parts.append(f"missing from the file: {', '.join(missing[:5])}")
    if unexpected:
        parts.append(f"not in the model: {', '.join(unexpected[:5])}")
    return "; ".join(parts)


def load_state_dict(model: nn.Module, path: str | os.PathLike[str], *, strict: bool = True,
                    key: str | None = None, assign: bool = False) -> LoadResult:
    """Load weights *and* frozen flags recorded by ``paramctl freeze`` into ``model``.

    Returns ``(missing_keys, unexpected_keys)``; with ``strict`` either is an error.
    Names absent from the file because they are tied to a present name (as Hugging Face
    drops ``lm_head.weight``) are not reported missing.

    >>> paramctl.load_state_dict(model, "ckpt.pt")  # doctest: +SKIP
    LoadResult(missing_keys=[], unexpected_keys=[])
    """
    source = _file_source(path, key)
    tensors: dict[str, torch.Tensor] = source.load_tensors()
    frozen = set(_frozen(source))
    tied = tied_names(model)
    # A name the file lacks is fine when a name it is tied to is in the file.
    tied_ok = {name for name, group in tied.items()
               if name not in tensors and any(m in tensors for m in group)}
    result = model.load_state_dict(tensors, strict=False, assign=assign)
    missing = [k for k in result.missing_keys if k not in tied_ok]
    unexpected = list(result.unexpected_keys)
    if strict and (missing or unexpected):
        raise SourceError(f"{path} does not match the model "
                          f"({describe_mismatch(missing, unexpected)}); "
                          "pass strict=False to load what matches")
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.is_floating_point() or p.is_complex():
            if name in frozen:
                p.requires_grad_(False)
            elif name in tensors:
                p.requires_grad_(True)
    return LoadResult(missing, unexpected)


def tied_names(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """name -> every name of the same Parameter object (itself included), in order."""
    named = list(model.named_parameters(remove_duplicate=False))
    others = tied_groups((name, id(p)) for name, p in named)
    return {name: (name, *others[name]) for name, _ in named}


def weights_loader(options: OpenOptions) -> Callable[[nn.Module, bool, str], None]:
    """What a module-path source calls to load ``--weights`` into the module it built
    (``assign`` keeps a meta-built module's tensors the checkpoint's)."""
    def load(module: nn.Module, assign: bool, spec: str) -> None:
        assert options.weights is not None
        result = load_state_dict(module, options.weights, strict=False, key=options.key,
                                 assign=assign)
        if result.missing_keys or result.unexpected_keys:
            raise SourceError(
                f"--weights {options.weights} does not fit {spec} "
                f"({describe_mismatch(result.missing_keys, result.unexpected_keys)})")

    return load
