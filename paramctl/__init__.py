"""paramctl: look inside PyTorch models and checkpoints, and decide which parameters train.

>>> import paramctl
>>> inv = paramctl.inspect("ckpt.safetensors")          # doctest: +SKIP
>>> paramctl.load_state_dict(model, "ckpt.pt")          # weights and frozen flags  # doctest: +SKIP
>>> paramctl.freeze(model, ["backbone.*"])              # doctest: +SKIP
>>> paramctl.apply_frozen(model, "ckpt.pt")             # flags only  # doctest: +SKIP

Importing paramctl does not import torch; the functions that need tensors do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Edit",
    "Inventory",
    "LoadResult",
    "MemEstimate",
    "OpenOptions",
    "ParamInfo",
    "ParamctlError",
    "ParamctlWarning",
    "__version__",
    "apply_frozen",
    "apply_rules",
    "change",
    "convert",
    "diff",
    "freeze",
    "frozen_names",
    "init_params",
    "inspect",
    "load_state_dict",
    "mem",
    "open_source",
    "save_module",
    "select",
    "stats",
    "unfreeze",
]

_LAZY = {
    "Edit": "paramctl.model",
    "OpenOptions": "paramctl.sources.base",
    "open_source": "paramctl.sources",
    "Inventory": "paramctl.model",
    "ParamInfo": "paramctl.model",
    "ParamctlError": "paramctl.errors",
    "ParamctlWarning": "paramctl.errors",
    "inspect": "paramctl.core",
    "change": "paramctl.core",
    "mem": "paramctl.core",
    "MemEstimate": "paramctl.memory",
    "select": "paramctl.patterns",
    "convert": "paramctl.api",
    "stats": "paramctl.values",
    "diff": "paramctl.values",
    "LoadResult": "paramctl.api",
    "apply_frozen": "paramctl.api",
    "apply_rules": "paramctl.api",
    "freeze": "paramctl.api",
    "frozen_names": "paramctl.api",
    "init_params": "paramctl.api",
    "load_state_dict": "paramctl.api",
    "save_module": "paramctl.api",
    "unfreeze": "paramctl.api",
}

if TYPE_CHECKING:
    from paramctl.api import (
        LoadResult,
        apply_frozen,
        apply_rules,
        convert,
        freeze,
        frozen_names,
        init_params,
        load_state_dict,
        save_module,
        unfreeze,
    )
    from paramctl.core import change, inspect, mem
    from paramctl.errors import ParamctlError, ParamctlWarning
    from paramctl.memory import MemEstimate
    from paramctl.model import Edit, Inventory, ParamInfo
    from paramctl.patterns import select
    from paramctl.sources import open_source
    from paramctl.sources.base import OpenOptions
    from paramctl.values import diff, stats


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'paramctl' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
