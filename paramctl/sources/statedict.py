"""Finding the state dict inside a checkpoint's wrapper dicts; pure and format-agnostic."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from paramctl.errors import SourceError

__all__ = ["WRAPPER_KEYS", "find_state_dict", "strip_prefix"]

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
