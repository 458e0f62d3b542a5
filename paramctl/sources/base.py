"""The one small protocol every format implements, and the registry that picks one."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from paramctl.errors import SourceError
from paramctl.model import ParamInfo

if TYPE_CHECKING:
    import torch

__all__ = [
    "Edit",
    "InitFn",
    "OpenOptions",
    "Source",
    "detect_format",
    "open_source",
    "register",
]

# Called with (name, tensor) for every tensor the edit initialises; changes it in place.
InitFn = Callable[[str, "torch.Tensor"], None]


@dataclass(frozen=True)
class OpenOptions:
    """How to read a source; mirrors the CLI's common options."""

    key: str | None = None
    args: Mapping[str, Any] = field(default_factory=dict)
    weights: Path | None = None
    unsafe_load: bool = False
    buffers: bool = False


@dataclass(frozen=True)
class Edit:
    """What a write changes. Names are the source's stored names.

    ``requires_grad`` holds only the names whose flag changes; ``init`` the names to
    re-initialise, each through ``init_fn``.
    """

    requires_grad: Mapping[str, bool] = field(default_factory=dict)
    init: frozenset[str] = frozenset()
    init_fn: InitFn | None = None
    # Output layout, not content: split a single-file source into shards of this size.
    max_shard_size: int | None = None

    @property
    def empty(self) -> bool:
        return not self.requires_grad and not self.init

    def frozen_after(self, frozen: Iterable[str], names: Iterable[str]) -> set[str]:
        """The frozen set once this edit's flags are applied, limited to ``names``."""
        out = set(frozen) & set(names)
        for name, want in self.requires_grad.items():
            if want:
                out.discard(name)
            else:
                out.add(name)
        return out


class Source(Protocol):
    """A model or checkpoint paramctl can read and write back."""

    display: str
    format: str

    def params(self) -> list[ParamInfo]:
        """Every named tensor, without reading tensor data where the format allows."""
        ...

    def write(self, edit: Edit, out: Path | None,
              progress: Callable[[int], None] | None = None) -> Path:
        """Apply ``edit`` and save, in place (``out is None``) or to ``out``; atomic."""
        ...

    def total_bytes(self) -> int:
        """Bytes a rewrite moves (for a progress bar)."""
        ...


Opener = Callable[[str, OpenOptions], Source]
Detector = Callable[[str], bool]
_REGISTRY: list[tuple[str, Detector, Opener]] = []


def register(fmt: str, detect: Detector, opener: Opener) -> None:
    """Add a format; detectors are tried in registration order."""
    _REGISTRY.append((fmt, detect, opener))


def detect_format(spec: str) -> str:
    for fmt, detect, _ in _REGISTRY:
        if detect(spec):
            return fmt
    if os.path.isdir(spec):
        raise SourceError(
            f"{spec} is a directory without a *.safetensors.index.json or a .metadata file; "
            "name a checkpoint file, a sharded index, a DCP folder or a module path"
        )
    if not os.path.exists(spec):
        if ":" in spec:
            raise SourceError(f"bad module path {spec!r}: expected pkg.module:attr or "
                              "path/to/file.py:attr (attr a class, factory or instance)")
        raise SourceError(f"no such file: {spec}")
    raise SourceError(
        f"{spec}: unknown checkpoint type; expected .pt .pth .bin .ckpt .safetensors, a "
        "sharded index, a DCP folder or a module path like pkg.mod:Model"
    )


def open_source(spec: str, options: OpenOptions | None = None) -> Source:
    """Open ``spec`` with the first format whose detector accepts it."""
    from paramctl import sources  # noqa: F401  (registers the built-in formats)

    options = options or OpenOptions()
    fmt = detect_format(spec)
    for name, _, opener in _REGISTRY:
        if name == fmt:
            return opener(spec, options)
    raise AssertionError(fmt)
