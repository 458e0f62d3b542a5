"""How each format is recognised from its spec: cheap checks of the name (and a stat or
two), kept apart from the readers so that choosing a reader imports only that reader.

Each reader module registers its own detector from here; ``paramctl.sources`` lists them
all, in detection order, without importing a reader before a spec is opened with it.
Remote specs (``https://``, ``hf://``) are recognised by the name at the end of the URL.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from paramctl.formats import BIN_INDEX_SUFFIX, DCP_METADATA, INDEX_SUFFIX, PT_EXTENSIONS
from paramctl.io.reader import is_remote, spec_name

__all__ = ["MODULE_SPEC", "dcp", "gguf", "is_module_path", "module", "pt",
           "safetensors", "sharded", "sharded_bin"]

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
    return not is_remote(spec) and not os.path.exists(spec) and is_module_path(spec)


def pt(spec: str) -> bool:
    if is_remote(spec):
        return spec_name(spec).lower().endswith(PT_EXTENSIONS)
    return spec.lower().endswith(PT_EXTENSIONS) and not os.path.isdir(spec) and (
        os.path.exists(spec) or ":" not in spec
    )


def safetensors(spec: str) -> bool:
    return spec_name(spec).lower().endswith(".safetensors") and not os.path.isdir(spec)


def gguf(spec: str) -> bool:
    return spec.lower().endswith(".gguf") and not os.path.isdir(spec)


def _folder_holding(spec: str, suffix: str) -> bool:
    if is_remote(spec) or not os.path.isdir(spec):
        return False
    return any(p.name.lower().endswith(suffix) for p in Path(spec).iterdir())


def sharded(spec: str) -> bool:
    if spec_name(spec).lower().endswith(INDEX_SUFFIX):
        return True
    return _folder_holding(spec, INDEX_SUFFIX)


def sharded_bin(spec: str) -> bool:
    if spec_name(spec).lower().endswith(BIN_INDEX_SUFFIX):
        return True
    return _folder_holding(spec, BIN_INDEX_SUFFIX)
