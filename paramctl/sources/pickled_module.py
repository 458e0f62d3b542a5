"""The tensors of a parsed torch pickle, named as torch names them; pure, and torch-free.

Two shapes of file hold named tensors:

- a state dict, possibly inside wrapper dicts or inert objects (a Lightning checkpoint, a
  dataclass holding ``model``), found by :func:`~paramctl.sources.statedict.find_state_dict`;
- a whole pickled ``nn.Module`` (``torch.save(model)``, or one under ``{"model": ...}``):
  an inert :class:`~paramctl.sources.pickle_vm.Placeholder` whose BUILD state is the
  module's ``__dict__``. Its ``_parameters``, ``_buffers`` and ``_modules`` dictionaries are
  walked in the order ``named_parameters(remove_duplicate=False)`` and
  ``named_buffers(remove_duplicate=False)`` walk them, so every name of a tied tensor is
  listed (the same pickled object reached twice through the memo).

A file that records ``Parameter`` objects tells parameters from buffers itself: in a
module the ``_buffers`` are buffers; in a state dict saved with ``keep_vars=True`` the plain
tensors beside its Parameters are (see :func:`_records_parameters` for how such a dict is
told from one paramctl marked frozen). Nothing here imports or calls anything from the
file.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from paramctl.errors import CorruptFileError, UnsafeFileError
from paramctl.model import FLOAT_DTYPES
from paramctl.sources.pickle_vm import Placeholder, TensorRef, _short, opaque_tensor
from paramctl.sources.statedict import find_state_dict

__all__ = ["ModuleTensors", "TensorState", "find_tensors", "is_module", "module_tensors"]

_MODULE_DICTS = ("_parameters", "_buffers", "_modules")
# What paramctl's writers splice around a plain tensor to record it frozen:
# ``_rebuild_parameter(<tensor>, False, OrderedDict())`` with unmemoised globals (torch's
# own pickler memoises every global and call result, so it never writes these bytes).
# ``unfreeze`` later flips the bool in place, so either bool may follow.
_MARK_PREFIX = b"ctorch._utils\n_rebuild_parameter\n"
_MARK_SUFFIX = b"ccollections\nOrderedDict\n)R\x87R"
# Last name parts that are parameters, never buffers, in practice.
_PARAMETER_NAMES = frozenset({"weight", "bias"})


class ModuleTensors(dict[str, TensorRef]):
    """name -> tensor of a pickled module: its parameters, then its buffers."""

    buffers: frozenset[str] = frozenset()
    # Buffers ``state_dict()`` leaves out (``register_buffer(..., persistent=False)``).
    non_persistent: frozenset[str] = frozenset()


@dataclass(frozen=True)
class TensorState:
    """The named tensors a pickle holds, where they are, and which are buffers."""

    key_path: tuple[str, ...]
    tensors: dict[str, TensorRef]
    buffers: frozenset[str]
    module: bool = False  # walked from a pickled nn.Module (not a dict of tensors)
    non_persistent: frozenset[str] = frozenset()  # buffers state_dict() would leave out
    state_id: int = 0  # id() of the dict the tensors were found in (its entries' spans)
    state_size: int = 0  # entries in that dict, tensors or not


def is_module(value: Any) -> bool:
    """Whether ``value`` is a pickled ``nn.Module``: its state holds the three dicts
    every module has (by structure, not by class name: user subclasses are modules too)."""
    if not isinstance(value, Placeholder):
        return False
    attributes = value.attributes()
    return all(isinstance(attributes.get(k), dict) for k in _MODULE_DICTS)


def _unreadable(name: str, value: Any, where: str) -> UnsafeFileError:
    kind = opaque_tensor(value)
    what = (f"a tensor of a kind paramctl reads only through torch ({kind})" if kind
            else f"a {value.description}" if isinstance(value, Placeholder)
            else f"a {type(value).__name__}")
    return UnsafeFileError(f"{where} {_short(name)} is {what}; if you trust the file, pass "
                           "--unsafe-load")


def _join(prefix: str, key: Any) -> str:
    if not isinstance(key, str):
        raise CorruptFileError(f"pickled module has a non-string attribute name {_short(key)}")
    return f"{prefix}.{key}" if prefix else key


def _named_modules(root: Placeholder, budget: int) -> list[tuple[str, Placeholder]]:
    """``named_modules(remove_duplicate=False)``: pre-order, shared submodules once per
    name. Iterative (no recursion limit), refuses a cycle, and stops at ``budget``
    modules-plus-name-characters (a DAG of shared modules can name 2**depth paths)."""
    out: list[tuple[str, Placeholder]] = []
    stack: list[tuple[Placeholder, str, bool]] = [(root, "", False)]
    on_path: set[int] = set()
    spent = 0
    while stack:
        module, prefix, leaving = stack.pop()
        if leaving:
            on_path.discard(id(module))
            continue
        if id(module) in on_path:
            raise CorruptFileError(f"the pickled module contains itself (at {_short(prefix)})")
        spent += 1 + len(prefix)
        if spent > budget:
            raise CorruptFileError("the pickled module tree names far more modules than the "
                                   "file holds (a pickle bomb?)")
        out.append((prefix, module))
        on_path.add(id(module))
        stack.append((module, prefix, True))
        children = []
        for key, child in module.attributes()["_modules"].items():
            if child is None:
                continue
            name = _join(prefix, key)
            if not is_module(child):
                raise _unreadable(name, child, "submodule")
            children.append((child, name, False))
        stack.extend(reversed(children))
    return out


def module_tensors(root: Placeholder, budget: int) -> ModuleTensors:
    """Every parameter name, then every buffer name (non-persistent ones included, as
    ``named_buffers()`` gives them), of the pickled module ``root``."""
    modules = _named_modules(root, budget)
    out = ModuleTensors()
    buffers: set[str] = set()
    non_persistent: set[str] = set()
    for attribute, is_buffer in (("_parameters", False), ("_buffers", True)):
        for prefix, module in modules:
            skipped = module.attributes().get("_non_persistent_buffers_set")
            skipped = skipped if is_buffer and isinstance(skipped, set | frozenset) else ()
            for key, value in module.attributes()[attribute].items():
                if value is None:  # e.g. Linear(bias=False): not listed by torch either
                    continue
                name = _join(prefix, key)
                if not isinstance(value, TensorRef):
                    raise _unreadable(name, value, "buffer" if is_buffer else "parameter")
                if name in out:
                    raise CorruptFileError(f"pickled module has two tensors named {_short(name)}")
                out[name] = value
                if is_buffer:
                    buffers.add(name)
                    if key in skipped:
                        non_persistent.add(name)
    out.buffers = frozenset(buffers)
    out.non_persistent = frozenset(non_persistent)
    return out


def _tensor_name(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, int | float):  # a dict keyed by position, as torch allows
        try:
            return str(key)
        except ValueError:  # an int too long to print is no name
            raise CorruptFileError(f"a tensor is stored under an integer key of over "
                                   f"{sys.get_int_max_str_digits()} digits") from None
    raise CorruptFileError(f"a tensor is stored under a {type(key).__name__} key "
                           f"({_short(key)}), not a name")


def written_by_paramctl(ref: TensorRef, data: bytes) -> bool:
    """Whether Parameter ``ref`` is a frozen mark a paramctl writer spliced around a plain
    state-dict tensor (then maybe unfrozen), not a Parameter torch itself pickled."""
    start, end = ref.span
    return data.startswith(_MARK_PREFIX, start) and data[start:end].endswith(_MARK_SUFFIX)


def _records_parameters(tensors: Mapping[str, TensorRef], data: bytes) -> bool:
    """Whether a state dict was saved with ``keep_vars=True`` (every parameter a
    Parameter, so the plain tensors are its buffers).

    Only a trainable Parameter torch wrote suggests it: paramctl itself (``freeze``,
    ``convert``, ``save_module``) records *frozen* tensors as Parameters beside plain
    trainable ones, and a later ``unfreeze`` flips them back to trainable in place. So a
    plain floating-point tensor named like a parameter (``*.weight``, ``*.bias``) beside
    them says the Parameters are such marks, or a hand-made mix: then nothing is a buffer
    by this rule (a loss module's ``weight`` buffer in a keep_vars file is the price).
    """
    if not any(ref.is_parameter and ref.requires_grad and not written_by_paramctl(ref, data)
               for ref in tensors.values()):
        return False
    return not any(not ref.is_parameter and ref.dtype in FLOAT_DTYPES
                   and name.rpartition(".")[2] in _PARAMETER_NAMES
                   for name, ref in tensors.items())


def find_tensors(root: Any, key: str | None, *, path: str, data: bytes) -> TensorState:
    """The named tensors in the parsed pickle ``root`` (``data`` is its bytes).

    A state dict is found as :func:`find_state_dict` finds it, looking into inert objects'
    attributes too; a pickled module, at the root or under a wrapper key, is walked. A
    tensor of a kind this reader cannot describe (quantized, sparse, a subclass...) among
    the listed ones is refused with the way out (``--unsafe-load``), never skipped.
    """
    walked: dict[int, ModuleTensors] = {}
    budget = len(data) + (1 << 20)

    def view(node: Any) -> Mapping[Any, Any] | None:
        if not isinstance(node, Placeholder):
            return None
        if is_module(node):
            if id(node) not in walked:
                walked[id(node)] = module_tensors(node, budget)
            return walked[id(node)]
        return node.fields() or None

    def is_tensor(value: Any) -> bool:
        return isinstance(value, TensorRef) or opaque_tensor(value) is not None

    try:
        key_path, state = find_state_dict(root, is_tensor, key, path=path, view=view)
        tensors: dict[str, TensorRef] = {}
        for k, v in state.items():
            if isinstance(v, TensorRef):
                tensors[_tensor_name(k)] = v
            elif opaque_tensor(v) is not None:
                raise _unreadable(_tensor_name(k), v, "tensor")
    except (UnsafeFileError, CorruptFileError) as exc:
        if str(exc).startswith(f"{path}: "):
            raise
        raise type(exc)(f"{path}: {exc}") from None
    if isinstance(state, ModuleTensors):
        return TensorState(key_path, tensors, state.buffers, module=True,
                           non_persistent=state.non_persistent)
    buffers: frozenset[str] = frozenset()
    if _records_parameters(tensors, data):
        buffers = frozenset(name for name, ref in tensors.items() if not ref.is_parameter)
    return TensorState(key_path, tensors, buffers, state_id=id(state), state_size=len(state))
