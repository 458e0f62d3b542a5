"""Loading a checkpoint's weights *and* frozen flags into a real module."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from paramctl.errors import ParamctlWarning, SourceError
from paramctl.model import FLOAT_DTYPES, tied_groups
from paramctl.sources import open_source
from paramctl.sources.base import OpenOptions, Source
from paramctl.sources.statedict import prefix_list, strip_prefixes, warn_prefix_unmatched

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["LoadResult", "apply_frozen", "describe_mismatch", "frozen_names", "load_state_dict",
           "prefix_hint", "tied_names"]

Prefixes = str | Sequence[str] | None


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


def _first(names: Sequence[str], n: int = 5) -> str:
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def describe_mismatch(missing: Sequence[str], unexpected: Sequence[str]) -> str:
    """``missing from the file: a, b; not in the model: c (+12 more)`` (first five of each,
    and how many were left out)."""
    parts = []
    if missing:
        parts.append(f"missing from the file: {_first(missing)}")
    if unexpected:
        parts.append(f"not in the model: {_first(unexpected)}")
    return "; ".join(parts)


_KNOWN_PREFIXES = ("module.", "_orig_mod.", "_orig_mod.module.", "module._orig_mod.")


def _dotted_prefixes(name: str, depth: int = 3) -> list[str]:
    parts = name.split(".")[:-1][:depth]
    return [".".join(parts[:i]) + "." for i in range(1, len(parts) + 1)]


def prefix_hint(file_names: Sequence[str], model_names: Sequence[str]) -> str | None:
    """What would make ``file_names`` fit ``model_names``, when a prefix explains the
    mismatch: ``pass strip_prefix='module.'`` (the file's names carry a prefix the model's
    lack: DDP's ``module.``, ``torch.compile``'s ``_orig_mod.``, a wrapper's ``model.``), or
    the reverse (the model's names are the file's under a submodule). ``None`` otherwise.

    >>> prefix_hint(["module.a.w", "module.b"], ["a.w", "b"])
    "pass strip_prefix='module.'"
    >>> prefix_hint(["a.w"], ["net.a.w", "head.w"])
    "the model's names are the file's under 'net.': use model.get_submodule('net')"
    """
    model = set(model_names)
    unexpected = [n for n in file_names if n not in model]
    if not unexpected:
        return None
    for known in _KNOWN_PREFIXES:
        if all(n.startswith(known) for n in file_names) and any(
                n[len(known):] in model for n in file_names):
            return f"pass strip_prefix={known!r}"
    first = unexpected[0]
    for cand in _dotted_prefixes(first):
        if all(n.startswith(cand) and n[len(cand):] in model for n in unexpected):
            return f"pass strip_prefix={cand!r}"
    for name in model_names:
        if name.endswith("." + first):
            cand = name[: -len(first)]
            if all(cand + n in model for n in unexpected):
                return (f"the model's names are the file's under {cand!r}: use "
                        f"model.get_submodule({cand[:-1]!r})")
    return None


def _shown_names(names: list[str], prefix: Prefixes, display: str) -> dict[str, str]:
    """stored -> shown once ``prefix`` is stripped (warning for a prefix that strips
    nothing)."""
    prefixes = prefix_list(prefix)
    if not prefixes:
        return {n: n for n in names}
    mapping, unmatched = strip_prefixes(names, prefixes)
    for missed in unmatched:
        warn_prefix_unmatched(missed, display, list(mapping))
    return {stored: shown for shown, stored in mapping.items()}


def load_state_dict(model: nn.Module, path: str | os.PathLike[str], *, strict: bool = True,
                    key: str | None = None, assign: bool = False,
                    strip_prefix: Prefixes = None) -> LoadResult:
    """Load weights *and* frozen flags recorded by ``paramctl freeze`` into ``model``.

    Returns ``(missing_keys, unexpected_keys)``; with ``strict`` either is an error, which
    says how many names it left out and, when a prefix explains the mismatch, which
    ``strip_prefix`` to pass. Names absent from the file because they are tied to a present
    name (as Hugging Face drops ``lm_head.weight``) are not reported missing.
    ``strip_prefix`` (a string or several, applied in order, each implying a trailing dot)
    removes a leading ``module.`` or ``_orig_mod.`` from the file's names.

    >>> paramctl.load_state_dict(model, "ckpt.pt", strip_prefix="module")  # doctest: +SKIP
    LoadResult(missing_keys=[], unexpected_keys=[])
    """
    source = _file_source(path, key)
    stored: dict[str, torch.Tensor] = source.load_tensors()
    shown = _shown_names(list(stored), strip_prefix, os.fspath(path))
    tensors = {shown[name]: t for name, t in stored.items()}
    frozen = {shown.get(name, name) for name in _frozen(source)}
    tied = tied_names(model)
    # A name the file lacks is fine when a name it is tied to is in the file.
    tied_ok = {name for name, group in tied.items()
               if name not in tensors and any(m in tensors for m in group)}
    result = model.load_state_dict(tensors, strict=False, assign=assign)
    missing = [k for k in result.missing_keys if k not in tied_ok]
    unexpected = list(result.unexpected_keys)
    if strict and (missing or unexpected):
        hint = prefix_hint(list(tensors), [n for n, _ in _named_tensors(model)])
        raise SourceError(f"{path} does not match the model "
                          f"({describe_mismatch(missing, unexpected)}); "
                          + (f"{hint}, or " if hint else "")
                          + "pass strict=False to load what matches")
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.is_floating_point() or p.is_complex():
            if name in frozen:
                p.requires_grad_(False)
            elif name in tensors:
                p.requires_grad_(True)
    return LoadResult(missing, unexpected)


def _named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """What ``model.state_dict()`` names: parameters and persistent buffers."""
    return list(model.state_dict(keep_vars=True).items())


def apply_frozen(model: nn.Module, path: str | os.PathLike[str], *,
                 strip_prefix: Prefixes = None, key: str | None = None) -> list[str]:
    """Freeze the parameters ``path`` records as frozen, in a model already loaded by any
    means (``from_pretrained``, a Lightning module, your own loader); returns the model's
    names it froze, tied names included, in the model's order.

    Reads the file's metadata only (no tensor data); sets ``requires_grad=False`` and
    changes nothing else: no weights, no other flag (what the file records trainable stays
    as the model has it). Frozen names the model has no parameter for are reported as a
    :class:`~paramctl.errors.ParamctlWarning` naming them and, when a prefix explains it,
    the ``strip_prefix`` to pass (or the submodule to apply to).

    >>> model = AutoModelForCausalLM.from_pretrained("out/")  # doctest: +SKIP
    >>> paramctl.apply_frozen(model, "out/model.safetensors")  # doctest: +SKIP
    ['model.embed_tokens.weight', ...]
    """
    import warnings

    source = open_source(os.fspath(path), OpenOptions(key=key))
    shown = _shown_names([p.name for p in source.params()], strip_prefix, os.fspath(path))
    frozen = [shown[name] for name in _frozen(source)]
    params = dict(model.named_parameters(remove_duplicate=False))
    absent = [n for n in frozen if n not in params]
    if absent:
        hint = prefix_hint(absent, [n for n, _ in _named_tensors(model)])
        warnings.warn(ParamctlWarning(
            f"{len(absent)} name{'s' if len(absent) != 1 else ''} recorded frozen in {path} "
            f"{'are' if len(absent) != 1 else 'is'} not a parameter of the model, left as "
            f"they are: {_first(absent)}" + (f"; {hint}" if hint else "")), stacklevel=2)
    for name in frozen:
        if name in params:
            params[name].requires_grad_(False)
    wanted = set(frozen)
    # A tied name shares its Parameter: freezing one froze every name of the group.
    tied = tied_names(model)
    return [n for n in params if any(t in wanted for t in tied[n])]


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
