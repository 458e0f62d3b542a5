"""Finding the state dict inside a checkpoint's wrapper dicts; pure and format-agnostic."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from paramctl.errors import ParamctlWarning, SourceError

__all__ = ["WRAPPER_KEYS", "View", "find_state_dict", "prefix_list", "strip_prefix",
           "strip_prefixes", "warn_prefix_unmatched"]

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
# How to look inside a value that is not a Mapping (an object's attributes, a module's
# tensors by name); None when it holds nothing to look into.
View = Callable[[Any], Mapping[Any, Any] | None]


def _no_view(value: Any) -> Mapping[Any, Any] | None:
    return None


def _as_mapping(value: Any, view: View) -> Mapping[Any, Any] | None:
    return value if isinstance(value, Mapping) else view(value)


def _has_tensors(value: Any, is_tensor: IsTensor) -> bool:
    return isinstance(value, Mapping) and any(is_tensor(v) for v in value.values())


def _kind(value: Any) -> str:
    # What a pickle reader built says what it is ("pickled argparse.Namespace object").
    description = getattr(value, "description", None)
    return description if isinstance(description, str) else type(value).__name__


def _text(key: Any) -> str:
    """A key from the file, bounded (an int of a million digits cannot even be printed)."""
    try:
        return str(key)[:60]
    except ValueError:
        return f"<{type(key).__name__}>"


def _describe_keys(value: Any, view: View = _no_view) -> str:
    mapping = _as_mapping(value, view)
    if mapping is None:
        return f"the file holds a {_kind(value)}, not a dict"
    keys = [_text(k) for k in list(mapping)[:12]]
    more = ", ..." if len(mapping) > 12 else ""
    what = "top-level keys" if mapping is value else f"a {_kind(value)} with attributes"
    if not keys:
        return "the dict is empty" if mapping is value else f"a {_kind(value)} without any"
    return f"{what}: {', '.join(keys)}{more}"


def _by_key(root: Any, key: str, view: View) -> tuple[tuple[str, ...], Any]:
    node = root
    path: list[str] = []
    rest = key
    while rest:
        mapping = _as_mapping(node, view)
        if mapping is None:
            break
        if rest in mapping:
            return (*path, rest), mapping[rest]
        head, dot, tail = rest.partition(".")
        if not dot or head not in mapping:
            break
        node, rest = mapping[head], tail
        path.append(head)
    raise SourceError(f"--key {key!r} is not in the checkpoint ({_describe_keys(root, view)})")


def find_state_dict(
    root: Any, is_tensor: IsTensor, key: str | None = None, *, path: str = "checkpoint",
    view: View = _no_view,
) -> tuple[tuple[str, ...], Mapping[str, Any]]:
    """Return ``(key path, mapping)`` of the state dict inside ``root``.

    ``key`` (dotted for nested wrappers) chooses explicitly. Otherwise a dict of tensors
    is used as it is, and common wrappers (``state_dict``, ``model``, ``ema``...) are
    looked into, up to three levels deep. ``view`` gives a Mapping for values that are not
    one (an object's attributes; a whole module's tensors by name), so wrappers may be
    objects too.
    """
    if key is not None:
        keys, found = _by_key(root, key, view)
        if is_tensor(found):
            raise SourceError(f"{path}: --key {key!r} is a single tensor, not a state dict")
        mapping = _as_mapping(found, view)
        if mapping is None:
            raise SourceError(f"{path}: --key {key!r} holds a {_kind(found)}, not a "
                              "state dict")
        if not _has_tensors(mapping, is_tensor):
            raise SourceError(f"{path}: --key {key!r} holds no tensors "
                              f"({_describe_keys(root, view)})")
        return keys, mapping
    node = _as_mapping(root, view)
    keys_path: tuple[str, ...] = ()
    for _ in range(3):
        if node is None:
            break
        if node and all(is_tensor(v) for v in node.values()):
            return keys_path, node
        for wrapper in WRAPPER_KEYS:
            child = _as_mapping(node.get(wrapper), view) if wrapper in node else None
            if child is not None and (
                _has_tensors(child, is_tensor)
                or any(_as_mapping(child.get(w), view) is not None
                       for w in WRAPPER_KEYS if w in child)
            ):
                node, keys_path = child, (*keys_path, wrapper)
                break
        else:
            if _has_tensors(node, is_tensor):
                return keys_path, node
            break
    if node is not None and _has_tensors(node, is_tensor):
        return keys_path, node
    if isinstance(root, Mapping) and not root:
        raise SourceError(f"{path}: the checkpoint holds an empty dict, no tensors")
    raise SourceError(f"{path}: no state dict found ({_describe_keys(root, view)}); "
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
