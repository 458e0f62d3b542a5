"""The Python API for training code: weights plus frozen flags, and in-memory edits."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from paramctl.errors import SourceError, UsageError
from paramctl.model import FLOAT_DTYPES, tied_groups
from paramctl.patterns import select
from paramctl.rules import InitRule, Step, load_rules_file, parse_init_rule, run_init
from paramctl.sources.base import Edit, OpenOptions, Source, open_source

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "LoadResult",
    "apply_rules",
    "freeze",
    "frozen_names",
    "init_params",
    "load_state_dict",
    "save_module",
    "unfreeze",
]


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
    tied = _tied_names(model)
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


def _set_trainable(model: nn.Module, patterns: Sequence[str], excludes: Sequence[str],
                   trainable: bool, allow_empty: bool) -> list[str]:
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    chosen = set(select(names, patterns, excludes, allow_empty=allow_empty, default_all=False))
    changed = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in chosen and (p.is_floating_point() or p.is_complex()):
            if p.requires_grad != trainable:
                changed.append(name)
            p.requires_grad_(trainable)
    return changed


def freeze(model: nn.Module, patterns: Sequence[str] | str, *, excludes: Sequence[str] = (),
           allow_empty: bool = False) -> list[str]:
    """Set ``requires_grad=False`` on matching parameters; returns the names changed.

    >>> paramctl.freeze(model, ["backbone.*"], excludes=["backbone.layer4"])  # doctest: +SKIP
    """
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    return _set_trainable(model, pats, excludes, False, allow_empty)


def unfreeze(model: nn.Module, patterns: Sequence[str] | str, *,
             excludes: Sequence[str] = (), allow_empty: bool = False) -> list[str]:
    """Set ``requires_grad=True`` on matching parameters; returns the names changed."""
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    return _set_trainable(model, pats, excludes, True, allow_empty)


def _tied_names(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """name -> every name of the same Parameter object (itself included), in order."""
    named = list(model.named_parameters(remove_duplicate=False))
    others = tied_groups((name, id(p)) for name, p in named)
    return {name: (name, *others[name]) for name, _ in named}


def _init_steps(model: nn.Module, steps: Sequence[Step], seed: int | None,
                allow_empty: bool) -> list[str]:
    import torch

    params = dict(model.named_parameters(remove_duplicate=False))
    tied = _tied_names(model)
    names = list(params)
    done: list[str] = []
    for step in steps:
        if step.kind == "init":
            for rule in step.rules:
                chosen = select(names, [rule.pattern], step.excludes, allow_empty=allow_empty,
                                default_all=False)
                seen: set[int] = set()
                for name in chosen:
                    p = params[name]
                    if id(p) in seen:
                        continue
                    seen.add(id(p))
                    if not (p.is_floating_point() or p.is_complex()):
                        raise UsageError(f"cannot initialise {name} ({p.dtype}): not floating")
                    # A tied group is one tensor, seeded by its first name in sorted order,
                    # exactly as the file writers do, whichever name was selected.
                    with torch.no_grad():
                        run_init(rule, min(tied[name]), p.data, seed)
                    done.extend(tied[name])
        else:
            _set_trainable(model, step.patterns, step.excludes, step.kind == "unfreeze",
                           allow_empty)
    return list(dict.fromkeys(done))


def init_params(model: nn.Module, rules: Sequence[str | InitRule], *, seed: int | None = None,
                allow_empty: bool = False) -> list[str]:
    """Re-initialise parameters in place by ``PATTERN=FN(...)`` rules; returns names touched.

    >>> paramctl.init_params(model, ["head.*.weight=normal(std=0.02)", "*.bias=zeros"],
    ...                      seed=0)  # doctest: +SKIP
    """
    parsed = [r if isinstance(r, InitRule) else parse_init_rule(r) for r in rules]
    steps = [Step("init", rules=(r,), where=r.text) for r in parsed]
    return _init_steps(model, steps, seed, allow_empty)


def apply_rules(model: nn.Module, rules: str | os.PathLike[str] | Sequence[Step], *,
                seed: int | None = None, allow_empty: bool = False) -> list[str]:
    """Apply a TOML rules file (or parsed steps) to an in-memory module, in order.

    >>> paramctl.apply_rules(model, "rules.toml", seed=1)  # doctest: +SKIP
    """
    if isinstance(rules, str | os.PathLike):
        steps, file_seed = load_rules_file(Path(rules))
        seed = seed if seed is not None else file_seed
    else:
        steps = list(rules)
    return _init_steps(model, steps, seed, allow_empty)


def apply_edit(model: nn.Module, edit: Edit) -> None:
    """Apply a writer :class:`Edit` to a real (non-meta) module in place."""
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


def save_module(model: nn.Module, out: Path) -> Path:
    """Save ``model``'s parameters and buffers with their frozen state, atomically.

    ``.safetensors`` records frozen names in ``__metadata__["paramctl.frozen"]`` and keeps
    one name per tied group (as Hugging Face does); other extensions get a torch zip whose
    frozen entries are ``nn.Parameter(requires_grad=False)``.
    """
    import torch

    from paramctl.fileio import atomic_write

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
