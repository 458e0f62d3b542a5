"""The one small protocol every format implements, and the registry that picks one."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from paramctl.errors import SourceError, UsageError
from paramctl.io.reader import is_remote, spec_name
from paramctl.model import Edit, InitFn, ParamInfo, TensorRecord
from paramctl.sources.sniff import sniff

if TYPE_CHECKING:
    from paramctl.io.files import FdPool

__all__ = [
    "Edit",
    "FileSource",
    "InitFn",
    "OpenOptions",
    "Source",
    "TensorRecord",
    "detect_format",
    "local_only",
    "open_as",
    "openers",
    "register",
    "register_lazy",
]


@dataclass(frozen=True)
class OpenOptions:
    """How to read a source; mirrors the CLI's common options."""

    key: str | None = None
    args: Mapping[str, Any] = field(default_factory=dict)
    weights: Path | None = None
    unsafe_load: bool = False
    buffers: bool = False


class Source(Protocol):
    """A model or checkpoint paramctl can read and write back."""

    display: str
    format: str

    def params(self) -> list[ParamInfo]:
        """Every named tensor, without reading tensor data where the format allows."""
        ...

    def total_bytes(self) -> int:
        """Bytes a rewrite moves (for a progress bar)."""
        ...


class FileSource(Source, Protocol):
    r"""A source stored in files: it can stream its tensors as :class:`TensorRecord`\ s
    (what the writers, ``stats`` and ``diff`` consume). Writing lives in ``writers/``."""

    def records(self, pool: FdPool) -> list[TensorRecord]:
        """Every tensor in stored order, with its current frozen flag and where its bytes
        are (fds come from ``pool`` and stay open until the pool closes)."""
        ...


Opener = Callable[[str, OpenOptions], Source]
Detector = Callable[[str], bool]
_REGISTRY: list[tuple[str, Detector, Opener]] = []


def register(fmt: str, detect: Detector, opener: Opener) -> None:
    """Add a format; detectors are tried in registration order. A format listed with
    :func:`register_lazy` is replaced where it stands (its place in the order kept)."""
    for i, (name, _, _) in enumerate(_REGISTRY):
        if name == fmt:
            _REGISTRY[i] = (fmt, detect, opener)
            return
    _REGISTRY.append((fmt, detect, opener))


def register_lazy(fmt: str, detect: Detector, module: str) -> None:
    """List a format whose reader ``module`` is imported only when a spec is opened with
    it; importing it runs its :func:`register`, which puts the real opener in place."""

    def opener(spec: str, options: OpenOptions) -> Source:
        import importlib

        importlib.import_module(module)
        for name, _, real in _REGISTRY:
            if name == fmt and real is not opener:
                return real(spec, options)
        raise AssertionError(f"{module} did not register the format {fmt!r}")

    register(fmt, detect, opener)


def detect_format(spec: str) -> str:
    """The first registered format whose detector accepts ``spec`` (by name); else, for an
    existing file, the format its first bytes show (``.pth.tar``, ``.pkl``, no extension)."""
    for fmt, detect, _ in _REGISTRY:
        if detect(spec):
            return fmt
    if is_remote(spec):
        if spec_name(spec).endswith(".bin.index.json"):
            raise SourceError(f"{spec}: sharded torch .bin checkpoints are not supported "
                              "remotely yet; download the files")
        raise SourceError(f"{spec}: unknown remote file type; name a .safetensors, "
                          ".safetensors.index.json, .pt, .pth, .bin or .ckpt file")
    if os.path.isdir(spec):
        raise SourceError(
            f"{spec} is a directory without a checkpoint paramctl recognises (a sharded "
            "index, a DCP .metadata file or a single weights file); name a checkpoint file, "
            "a sharded index, a DCP folder or a module path"
        )
    if not os.path.exists(spec):
        if ":" in spec:
            raise SourceError(f"bad module path {spec!r}: expected pkg.module:attr or "
                              "path/to/file.py:attr (attr a class, factory or instance)")
        raise SourceError(f"no such file: {spec}")
    found = sniff(spec)
    if found is not None and any(fmt == found for fmt, _, _ in _REGISTRY):
        return found
    raise SourceError(
        f"{spec}: unknown checkpoint type (neither its name nor its first bytes match a "
        "format paramctl reads); expected a torch zip (.pt .pth .bin .ckpt, or any name), "
        ".safetensors, .gguf, a sharded index, a DCP folder or a module path like "
        "pkg.mod:Model"
    )


def local_only(display: str, remote: bool) -> None:
    """Refuse to read tensor values of a remote source (only metadata is fetched)."""
    if remote:
        raise UsageError(f"{display}: remote sources are read-only; download first")


def open_as(fmt: str, spec: str, options: OpenOptions) -> Source:
    """Open ``spec`` with the reader registered as ``fmt``, whatever its name: how a
    format built from files of another (the shards of a sharded ``.bin``) reads them
    without importing that format's module."""
    for name, _, opener in _REGISTRY:
        if name == fmt:
            return opener(spec, options)
    raise AssertionError(f"format {fmt!r} is not registered")


def openers() -> list[tuple[str, Detector, Opener]]:
    """The registered formats, in detection order."""
    return list(_REGISTRY)
