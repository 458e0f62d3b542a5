"""How each format is recognised from its spec: cheap checks of the name (and a stat or
two), kept apart from the readers so that choosing a reader imports only that reader.

Each reader module registers its own detector from here; ``paramctl.sources`` lists them
all, in detection order, without importing a reader before a spec is opened with it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from paramctl.formats import DCP_METADATA, INDEX_SUFFIX, PT_EXTENSIONS
from paramctl.io.reader import is_remote

__all__ = ["MODULE_SPEC", "dcp", "is_module_path", "module", "pt", "safetensors", "sharded"]

MODULE_SPEC = re.compile(r"^(?P<target>[^:]+):(?P<attr>[A-Za-z_][\w.]*)$")


def is_module_path(spec: str) -> bool:
    if MODULE_SPEC.match(spec) is None:
        return False
    target = spec.split(":", 1)[0]
    return target.endswith(".py") or os.sep in target or all(
        part.isidentifier() for part in target.split(".")
    )


def dcp(spec: str) -> bool:
    return os.path.isdir(spec) and os.path.isfile(os.path.join(spec, DCP_METADATA))


def module(spec: str) -> bool:
    return not os.path.exists(spec) and is_module_path(spec)


def pt(spec: str) -> bool:
    return spec.lower().endswith(PT_EXTENSIONS) and not os.path.isdir(spec) and (
        os.path.exists(spec) or ":" not in spec
    )


def safetensors(spec: str) -> bool:
    return spec.lower().endswith(".safetensors") and not os.path.isdir(spec)


def sharded(spec: str) -> bool:
    if spec.endswith(INDEX_SUFFIX):
        return True
    if is_remote(spec):
        return False
    path = Path(spec)
    return path.is_dir() and any(p.name.endswith(INDEX_SUFFIX) for p in path.iterdir())
