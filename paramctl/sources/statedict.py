"""Finding the state dict inside a checkpoint's wrapper dicts; pure and format-agnostic."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from paramctl.errors import ParamctlWarning, SourceError

__all__ = ["WRAPPER_KEYS", "find_state_dict", "prefix_list", "strip_prefix", "strip_prefixes",
           "warn_prefix_unmatched"]

WRAPPER_KEYS = (
    "state_dict",
    "model",
    "module",
    "model_state_dict",
    "state_dict_ema",
    "model_ema",
    "ema",
)

IsTensor = Callable[[Any], bool]


def _has_tensors(value: Any, is_tensor: IsTensor) -> bool:
    return isinstance(value, Mapping) and any(is_tensor(v) for v in value.values())


def _describe_keys(value: Any) -> str:
    if not isinstance(value, Mapping):
        return f"the file holds a {type(value).__name__}, not a dict"
    keys = [str(k) for k in value][:12]
    more = ", ..." if len(value) > 12 else ""
    return f"top-level keys: {', '.join(keys)}{more}" if keys else "the dict is empty"


def _by_key(root: Any, key: str) -> tuple[tuple[str, ...], Any]:
    node = root
    path: list[str] = []
    rest = key
    while rest:
        if not isinstance(node, Mapping):
            break
        if rest in node:
            return (*path, rest), node[rest]
        head, dot, tail = rest.partition(".")
        if not dot or head not in node:
            break
        node, rest = node[head], tail
        path.append(head)
    raise SourceError(f"--key {key!r} is not in the checkpoint ({_describe_keys(root)})")


def find_state_dict(
    root: Any, is_tensor: IsTensor, key: str | None = None, *, path: str = "checkpoint"
) -> tuple[tuple[str, ...], Mapping[str, Any]]:
    """Return ``(key path, mapping)`` of the state dict inside ``root``.

    ``key`` (dotted for nested wrappers) chooses explicitly. Otherwise a dict of tensors
    is used as it is, and common wrappers (``state_dict``, ``model``, ``ema``...) are
    looked into, up to three levels deep.
    """
    if key is not None:
        keys, found = _by_key(root, key)
        if is_tensor(found):
            raise SourceError(f"{path}: --key {key!r} is a single tensor, not a state dict")
        if not isinstance(found, Mapping):
            raise SourceError(f"{path}: --key {key!r} holds a {type(found).__name__}, not a "
                              "state dict")
        if not _has_tensors(found, is_tensor):
            raise SourceError(f"{path}: --key {key!r} holds no tensors "
                              f"({_describe_keys(root)})")
        return keys, found
    node = root
    keys_path: tuple[str, ...] = ()
    for _ in range(3):
        if not isinstance(node, Mapping):
            break
        if node and all(is_tensor(v) for v in node.values()):
            return keys_path, node
        for wrapper in WRAPPER_KEYS:
            child = node.get(wrapper)
            if isinstance(child, Mapping) and (
                _has_tensors(child, is_tensor)
                or any(isinstance(child.get(w), Mapping) for w in WRAPPER_KEYS)
            ):
                node, keys_path = child, (*keys_path, wrapper)
                break
        else:
            if _has_tensors(node, is_tensor):
                return keys_path, node
            break
    if isinstance(node, Mapping) and _has_tensors(node, is_tensor):
        return keys_path, node
    if isinstance(root, Mapping) and not root:
        raise SourceError(f"{path}: the checkpoint holds an empty dict, no tensors")
    raise SourceError(f"{path}: no state dict found ({_describe_keys(root)}); "
                      "choose one with --key")


def strip_prefix(names: list[str], prefix: str) -> dict[str, str]:
    """Map shown name -> stored name, removing ``prefix`` where a name starts with it."""
    shown: dict[str, str] = {}
    for name in names:
        view = name[len(prefix):] if prefix and name.startswith(prefix) else name
        if view in shown:
            raise SourceError(f"--strip-prefix {prefix!r} makes two names collide: {view!r}")
        shown[view] = name
    return shown


def prefix_list(prefix: str | Sequence[str] | None) -> list[str]:
    """Normalise ``strip_prefix`` arguments: one string or several, each ending in a dot.

    ``"module"`` and ``"module."`` both strip ``module.`` (a prefix is a module path, so
    ``"mod"`` never turns ``model.x`` into ``el.x``); empty strings are dropped.

    >>> prefix_list(["_orig_mod", "module."])
    ['_orig_mod.', 'module.']
    """
    if prefix is None:
        return []
    items = [prefix] if isinstance(prefix, str) else list(prefix)
    return [p if p.endswith(".") else p + "." for p in items if p]


def strip_prefixes(names: list[str], prefixes: Sequence[str]
                   ) -> tuple[dict[str, str], list[str]]:
    """Apply ``prefixes`` in order (each to the names the previous one left) and return
    ``(shown -> stored, prefixes that matched no name)``.

    >>> strip_prefixes(["_orig_mod.module.w"], ["_orig_mod.", "module.", "x."])
    ({'w': '_orig_mod.module.w'}, ['x.'])
    """
    shown = {n: n for n in names}
    unmatched: list[str] = []
    for prefix in prefixes:
        if not any(view.startswith(prefix) for view in shown):
            unmatched.append(prefix)
            continue
        stripped = strip_prefix(list(shown), prefix)
        shown = {view: shown[before] for view, before in stripped.items()}
    return shown, unmatched


def warn_prefix_unmatched(prefix: str, display: str, names: Sequence[str]) -> None:
    """Warn (:class:`ParamctlWarning`) that ``prefix`` strips nothing, naming what the
    names do start with."""
    import warnings

    heads = list(dict.fromkeys(n.split(".", 1)[0] + ("." if "." in n else "") for n in names))
    shown = ", ".join(heads[:4]) + (", ..." if len(heads) > 4 else "")
    warnings.warn(ParamctlWarning(
        f"strip prefix {prefix!r} matches no name in {display}"
        + (f" (names start with {shown})" if heads else "")), stacklevel=2)
