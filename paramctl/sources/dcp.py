"""torch.distributed.checkpoint (DCP) folders: a ``.metadata`` file plus ``*.distcp`` data.

``list`` reads ``.metadata`` alone through the restricted pickle machine, extended with
the handful of DCP dataclasses it holds (``Metadata``, ``TensorStorageMetadata``...), so no
torch import and no code from the file; anything else in it is an inert placeholder. The
frozen state lives beside the data in ``.paramctl.json`` (``{"frozen": [...]}``): DCP
ignores files it does not reference, so ``torch.distributed.checkpoint.load`` still accepts
the folder. ``init`` and conversions go through torch.distributed.checkpoint itself;
non-tensor entries are carried as their raw stored bytes and are never unpickled.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paramctl.errors import CorruptFileError, OperationError, SourceError, UnsafeFileError
from paramctl.formats import DCP_FROZEN_FILE, DCP_METADATA
from paramctl.io.files import FdPool
from paramctl.model import DTYPE_SIZES, FLOAT_DTYPES, Edit, ParamInfo, TensorRecord, mark_buffers
from paramctl.sources import detect
from paramctl.sources.base import OpenOptions, register
from paramctl.sources.pickle_vm import (
    _DTYPE_ALIASES,
    _DTYPE_GLOBALS,
    Global,
    Placeholder,
    _Machine,
    parse_pickle,
)

__all__ = ["FROZEN_FILE", "DcpSource", "read_metadata"]

FROZEN_FILE = DCP_FROZEN_FILE
METADATA = DCP_METADATA
MAX_METADATA_BYTES = 1 << 30

_DCP = "torch.distributed.checkpoint.metadata"
_RECORD_CLASSES = {
    (_DCP, "Metadata"),
    (_DCP, "TensorStorageMetadata"),
    (_DCP, "BytesStorageMetadata"),
    (_DCP, "TensorProperties"),
    (_DCP, "ChunkStorageMetadata"),
    (_DCP, "MetadataIndex"),
    (_DCP, "StorageMeta"),
    (_DCP, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


@dataclass(eq=False)
class Obj:
    """An instance of an allowlisted DCP class, kept as plain data (never constructed)."""

    cls: str
    args: tuple[Any, ...] = ()
    state: Any = None
    attrs: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)


class _DcpMachine(_Machine):
    def _global(self, module: str, name: str, pos: int) -> None:
        if (module, name) in _RECORD_CLASSES:
            self.push(Global(module, name), pos)
            return
        super()._global(module, name, pos)

    def _call(self, func: Global, args: tuple[Any, ...], spans: Any, span: Any) -> Any:
        if (func.module, func.name) in _RECORD_CLASSES:
            return Obj(func.name, args)
        return super()._call(func, args, spans, span)

    def op_NEWOBJ(self, arg: Any, pos: int, end: int) -> None:
        args, _ = self.pop()
        cls, start = self.pop()
        if isinstance(cls, Global) and (cls.module, cls.name) in _RECORD_CLASSES and \
                isinstance(args, tuple):
            self.push(Obj(cls.name, args), start)
            return
        self.push(cls, start)
        self.push(args, start)
        super().op_NEWOBJ(arg, pos, end)

    def op_BUILD(self, arg: Any, pos: int, end: int) -> None:
        state, _ = self.pop()
        target = self.top()
        if isinstance(target, Obj):
            target.state = state
            if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
                state = {**(state[0] or {}), **state[1]}  # (dict, slots)
            if isinstance(state, dict):
                target.attrs.update({str(k): v for k, v in state.items()})
            return
        self.push(state, pos)
        super().op_BUILD(arg, pos, end)


@dataclass(frozen=True)
class DcpEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass
class DcpMetadata:
    tensors: list[DcpEntry]
    byte_entries: list[str]
    storage: dict[tuple[str, tuple[int, ...]], tuple[str, int, int, bool]]


def _dtype(value: Any, where: str) -> str:
    if isinstance(value, Global) and value.module == "torch" and value.name in _DTYPE_GLOBALS:
        return _DTYPE_ALIASES.get(value.name, value.name)
    raise CorruptFileError(f"{where}: unknown dtype in DCP metadata")


def _read_metadata_unsafe(folder: Path) -> DcpMetadata:
    """``--unsafe-load``: let DCP's own reader unpickle ``.metadata`` (runs its code)."""
    import warnings

    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from paramctl.tensors import dtype_name

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            meta = FileSystemReader(str(folder)).read_metadata()
        except Exception as exc:  # arbitrary code ran; anything can come out
            raise CorruptFileError(f"{folder}: cannot read DCP metadata: {exc}") from None
    tensors, byte_entries = [], []
    for name, item in meta.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            tensors.append(DcpEntry(name, dtype_name(item.properties.dtype), tuple(item.size)))
        else:
            byte_entries.append(name)
    storage = {}
    for index, info in (meta.storage_data or {}).items():
        storage[(index.fqn, tuple(index.offset or ()))] = (
            info.relative_path, info.offset, info.length, bool(info.transform_descriptors))
    return DcpMetadata(tensors, byte_entries, storage)


def read_metadata(folder: Path, *, unsafe_load: bool = False) -> DcpMetadata:
    """Parse ``folder/.metadata`` without torch; validate what the commands rely on."""
    try:
        return _read_metadata_safe(folder)
    except UnsafeFileError:
        if not unsafe_load:
            raise
        return _read_metadata_unsafe(folder)


def _read_metadata_safe(folder: Path) -> DcpMetadata:
    path = folder / METADATA
    try:
        size = path.stat().st_size
        if size > MAX_METADATA_BYTES:
            raise CorruptFileError(f"{path}: implausibly large ({size} bytes)")
        data = path.read_bytes()
    except FileNotFoundError:
        raise SourceError(f"{folder}: not a DCP checkpoint (no {METADATA})") from None
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror}") from None
    if not data:
        raise CorruptFileError(f"{path}: the file is empty")
    try:
        root = parse_pickle(data, _DcpMachine).root
    except (CorruptFileError, UnsafeFileError) as exc:
        raise type(exc)(f"{path}: {exc}") from None
    if isinstance(root, Placeholder):
        # Something DCP does not write (os.system(...), a user's class): kept inert here.
        # DCP's own reader would build it, which is what --unsafe-load hands it to.
        raise UnsafeFileError(
            f"{path}: not DCP metadata: the pickle builds a '{root.type_name}' object, "
            "which paramctl never runs. If you trust the file, pass --unsafe-load")
    if not isinstance(root, Obj) or root.cls != "Metadata":
        raise CorruptFileError(f"{path}: not DCP metadata")
    sdm = root.get("state_dict_metadata")
    if not isinstance(sdm, dict):
        raise CorruptFileError(f"{path}: metadata has no state_dict_metadata")
    tensors: list[DcpEntry] = []
    byte_entries: list[str] = []
    for name, meta in sdm.items():
        if not isinstance(meta, Obj):
            raise CorruptFileError(f"{path}: malformed entry for {name!r}")
        if meta.cls == "BytesStorageMetadata":
            byte_entries.append(str(name))
            continue
        if meta.cls != "TensorStorageMetadata":
            raise CorruptFileError(f"{path}: unknown entry type {meta.cls} for {name!r}")
        props = meta.get("properties")
        state = props.state if isinstance(props, Obj) else None
        dtype_value = state[0] if isinstance(state, tuple) and state else \
            props.get("dtype") if isinstance(props, Obj) else None
        shape = meta.get("size")
        if isinstance(shape, Obj):
            shape = shape.args[0] if shape.args else ()
        if not isinstance(shape, tuple | list) or not all(
                isinstance(d, int) and d >= 0 for d in shape):
            raise CorruptFileError(f"{path}: malformed shape for {name!r}")
        tensors.append(DcpEntry(str(name), _dtype(dtype_value, str(path)), tuple(shape)))
    storage: dict[tuple[str, tuple[int, ...]], tuple[str, int, int, bool]] = {}
    raw_storage = root.get("storage_data")
    if isinstance(raw_storage, dict):
        for index, info in raw_storage.items():
            if isinstance(index, Obj) and isinstance(info, Obj):
                fqn = index.get("fqn")
                offset = index.get("offset")
                key = (str(fqn), tuple(offset) if isinstance(offset, tuple | list) else ())
                storage[key] = (str(info.get("relative_path")), int(info.get("offset", 0)),
                                int(info.get("length", 0)),
                                bool(info.get("transform_descriptors")))
    return DcpMetadata(tensors, byte_entries, storage)


def read_frozen(folder: Path) -> set[str]:
    path = folder / FROZEN_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return set()
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path}: unreadable ({exc})") from None
    names = doc.get("frozen") if isinstance(doc, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CorruptFileError(f"{path}: expected {{\"frozen\": [names]}}")
    return set(names)


class DcpSource:
    format = "dcp"

    def __init__(self, spec: str, options: OpenOptions) -> None:
        self.display = spec
        self.folder = Path(spec)
        self.options = options
        if options.key:
            raise SourceError("--key applies to torch checkpoints")
        self.meta = read_metadata(self.folder, unsafe_load=options.unsafe_load)
        self.frozen = read_frozen(self.folder)

    def params(self) -> list[ParamInfo]:
        out = []
        for e in self.meta.tensors:
            numel = math.prod(e.shape)
            out.append(ParamInfo(
                name=e.name, shape=e.shape, dtype=e.dtype, numel=numel,
                nbytes=numel * DTYPE_SIZES.get(e.dtype, 1),
                requires_grad=e.dtype in FLOAT_DTYPES and e.name not in self.frozen))
        return mark_buffers(out)

    def total_bytes(self) -> int:
        return sum(p.nbytes for p in self.params())

    def new_frozen(self, edit: Edit) -> set[str]:
        return edit.frozen_after(self.frozen, (e.name for e in self.meta.tensors))

    def load_named(self, names: list[str]) -> dict[str, Any]:
        """Tensors by name through DCP's own loader (bytes entries are never touched)."""
        import warnings

        import torch
        import torch.distributed.checkpoint as dcp

        from paramctl.tensors import no_dist, torch_dtype

        by_name = {e.name: e for e in self.meta.tensors}
        state = {n: torch.empty(by_name[n].shape, dtype=torch_dtype(by_name[n].dtype))
                 for n in names}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                dcp.load(state, checkpoint_id=str(self.folder),  # type: ignore[attr-defined]
                         no_dist=no_dist())
            except Exception as exc:  # DCP wraps reader errors in its own types
                raise CorruptFileError(f"{self.display}: torch.distributed.checkpoint.load "
                                       f"failed: {str(exc).splitlines()[0]}") from None
        return state

    def raw_bytes(self, name: str) -> bytes:
        hits = [v for (fqn, _), v in self.meta.storage.items() if fqn == name]
        if len(hits) != 1:
            raise OperationError(f"{self.display}: cannot locate the stored bytes of {name!r}")
        rel, offset, length, transformed = hits[0]
        if transformed:
            raise OperationError(f"{self.display}: entry {name!r} is stored with a transform; "
                                 "paramctl cannot carry it through a rewrite")
        path = (self.folder / rel).resolve()
        if self.folder.resolve() not in path.parents:
            raise CorruptFileError(f"{self.display}: storage path {rel!r} leaves the folder")
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(length)
        if len(data) != length:
            raise CorruptFileError(f"{self.display}: {rel} is truncated")
        return data

    def records(self, pool: FdPool) -> list[TensorRecord]:
        """Every tensor, each loaded through DCP's own reader when a writer asks for it."""
        def loader(name: str) -> Callable[[], bytes]:
            def load() -> bytes:
                from paramctl.tensors import tensor_bytes

                return tensor_bytes(self.load_named([name])[name])
            return load

        return [TensorRecord(p.name, p.dtype, p.shape, p.name in self.frozen, p.nbytes,
                             load=loader(p.name)) for p in self.params()]

    def conversion_warnings(self, out: Path) -> list[str]:
        if out.suffix and self.meta.byte_entries:
            names = ", ".join(self.meta.byte_entries[:5])
            more = ", ..." if len(self.meta.byte_entries) > 5 else ""
            return [f"{out} holds tensors only; the non-tensor entries of {self.display} "
                    f"({names}{more}) are not carried over"]
        return []

    def load_tensors(self) -> dict[str, Any]:
        """Every tensor entry through DCP's own loader (non-tensor entries are skipped)."""
        return self.load_named([e.name for e in self.meta.tensors])

register("dcp", detect.dcp, DcpSource)
