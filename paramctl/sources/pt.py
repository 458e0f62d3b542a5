"""torch zip checkpoints (``.pt .pth .bin .ckpt``), read and rewritten without torch.

Reading runs :mod:`paramctl.sources.pickle_vm` over ``data.pkl``. Freezing splices the
pickle: a plain tensor entry becomes ``torch._utils._rebuild_parameter(<tensor>, False,
OrderedDict())`` (exactly what ``torch.save`` writes for a frozen ``nn.Parameter``), an
existing Parameter has its ``requires_grad`` byte flipped. Every other pickle byte and every
tensor record is copied unchanged.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from paramctl.errors import CorruptFileError, SourceError, UnsafeFileError
from paramctl.formats import PT_EXTENSIONS
from paramctl.formats.zip import Record, read_records
from paramctl.io.files import FdPool, read_exact
from paramctl.io.reader import ByteReader, LocalReader, is_remote, open_reader
from paramctl.model import DTYPE_SIZES, FLOAT_DTYPES, ParamInfo, TensorRecord, tied_groups
from paramctl.sources import detect
from paramctl.sources.base import OpenOptions, register
from paramctl.sources.pickle_vm import ParsedPickle, TensorRef, parse_pickle
from paramctl.sources.statedict import find_state_dict

__all__ = ["EXTENSIONS", "PtSource", "UnsafePtSource", "open_pt"]

EXTENSIONS = PT_EXTENSIONS
MAX_PICKLE_BYTES = 1 << 30
_ZIP_MAGIC = b"PK\x03\x04"


def _first_unsafe_global(data: bytes) -> str | None:
    """Scan the successive pickles of a legacy torch file, without running them, for the
    first global a tensor checkpoint would not need."""
    import io
    import pickletools

    from paramctl.sources.pickle_vm import _Machine

    stream = io.BytesIO(data)
    checker = _Machine(b"")
    strings: list[str] = []
    try:
        for _ in range(8):  # magic, protocol, sys info, the object, storage keys
            if stream.tell() >= len(data):
                return None
            for op, arg, _pos in pickletools.genops(stream):
                if isinstance(arg, str):
                    strings = [*strings[-1:], arg]
                name = None
                if op.name in ("GLOBAL", "INST"):
                    name = str(arg).replace(" ", ".", 1)
                elif op.name == "STACK_GLOBAL" and len(strings) == 2:
                    name = ".".join(strings)
                if name is not None:
                    module, _, attr = name.rpartition(".")
                    try:
                        checker._global(module, attr, 0)
                    except UnsafeFileError:
                        return name
                if op.name == "STOP":
                    break
    except (ValueError, EOFError, UnicodeError, struct.error):
        return None
    return None


def _classify_non_zip(path: str, head: bytes, reader: ByteReader) -> SourceError:
    if not head:
        return CorruptFileError(f"{path}: the file is empty")
    if head[:1] == b"\x80":
        bad = _first_unsafe_global(reader.pread(64 << 20, 0))
        what = f"it refers to global '{bad}', and reading it" if bad else "reading it"
        return UnsafeFileError(
            f"{path}: legacy (pre-1.6, non-zip) torch format; {what} means unpickling "
            "arbitrary objects. If you trust the file, pass --unsafe-load, or re-save it "
            "with torch.save"
        )
    if head.startswith(b"PK"):
        return CorruptFileError(f"{path}: damaged zip archive")
    return CorruptFileError(f"{path}: not a torch checkpoint (not a zip archive)")


class PtSource:
    """A torch zip checkpoint; ``state`` is everything parsed from it."""

    format = "pt"
    unsafe = False

    def __init__(self, path: str, options: OpenOptions) -> None:
        self.display = path
        self.path = Path(path)
        self.options = options
        self.remote = is_remote(path)
        reader = open_reader(path)
        try:
            self.identity = reader.identity if isinstance(reader, LocalReader) else None
            size = reader.size
            head = reader.pread(4, 0)
            if head != _ZIP_MAGIC:
                raise _classify_non_zip(path, head, reader)
            self.zip_records = read_records(reader)
            self.pickle_record = self._find_pickle(path)
            # From the same reader as the records: never a pickle of some other file.
            self.pickle_bytes = reader.pread(self.pickle_record.size, self.pickle_record.offset)
        finally:
            reader.close()
        if len(self.pickle_bytes) != self.pickle_record.size:
            raise CorruptFileError(f"{path}: truncated data.pkl")
        self.file_size = size
        self.prefix = self.pickle_record.name[: -len("data.pkl")]
        self.by_name = {r.name: r for r in self.zip_records}
        try:
            self.parsed: ParsedPickle = parse_pickle(self.pickle_bytes)
        except (UnsafeFileError, CorruptFileError) as exc:
            raise type(exc)(f"{path}: {exc}") from None
        self.key_path, state = find_state_dict(
            self.parsed.root, lambda v: isinstance(v, TensorRef), options.key, path=path
        )
        self.tensors: dict[str, TensorRef] = {
            str(k): v for k, v in state.items() if isinstance(v, TensorRef)
        }
        # Where each entry of the state dict is in the pickle (renames and drops splice it).
        self.entry_spans = self.parsed.entries.get(id(state), {})
        # Only tensors, directly under the root: a fresh state dict loses nothing.
        self.plain = not self.key_path and len(self.tensors) == len(state)
        self._check_storages()

    # -- reading -----------------------------------------------------------------------
    def _find_pickle(self, path: str) -> Record:
        names = [r.name for r in self.zip_records]
        pkl = next((r for r in self.zip_records if r.name.endswith("data.pkl")
                    and r.name.count("/") == 1), None)
        if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
            raise SourceError(f"{path}: a TorchScript archive, not a checkpoint; "
                              "open it with torch.jit.load")
        if pkl is None:
            raise CorruptFileError(f"{path}: not a torch checkpoint (no data.pkl record)")
        if pkl.size > MAX_PICKLE_BYTES:
            raise CorruptFileError(f"{path}: data.pkl is {pkl.size} bytes, over the "
                                   f"{MAX_PICKLE_BYTES} byte limit")
        return pkl

    def _storage_record(self, ref: TensorRef) -> Record:
        rec = self.by_name.get(f"{self.prefix}data/{ref.storage.key}")
        if rec is None:
            raise CorruptFileError(
                f"{self.display}: missing data record for storage {ref.storage.key}"
            )
        return rec

    def _check_storages(self) -> None:
        for name, ref in self.tensors.items():
            rec = self._storage_record(ref)
            unit = 1 if ref.storage.untyped else DTYPE_SIZES.get(ref.storage.dtype, 1)
            if rec.size != ref.storage.numel * unit:
                raise CorruptFileError(
                    f"{self.display}: record for {name!r} holds {rec.size} bytes, but its "
                    f"storage needs {ref.storage.numel * unit}"
                )
            item = DTYPE_SIZES.get(ref.dtype, 1)
            extent = 0 if ref.numel == 0 else 1 + sum(
                (d - 1) * s for d, s in zip(ref.shape, ref.stride, strict=True))
            if ref.numel and (ref.offset + extent) * item > rec.size:
                raise CorruptFileError(
                    f"{self.display}: tensor {name!r} reaches past the end of its storage"
                )

    def params(self) -> list[ParamInfo]:
        tied = tied_groups((name, self._identity(ref)) for name, ref in self.tensors.items())
        out = []
        for name, ref in self.tensors.items():
            frozen = ref.is_parameter and not ref.requires_grad
            out.append(ParamInfo(
                name=name,
                shape=ref.shape,
                dtype=ref.dtype,
                numel=ref.numel,
                nbytes=ref.numel * DTYPE_SIZES.get(ref.dtype, 1),
                requires_grad=ref.dtype in FLOAT_DTYPES and not frozen,
                tied=tied[name],
            ))
        return out

    @staticmethod
    def _identity(ref: TensorRef) -> tuple[Any, ...]:
        return (ref.storage.key, ref.offset, ref.shape, ref.stride, ref.dtype)

    def total_bytes(self) -> int:
        return self.file_size

    # -- tensor bytes ------------------------------------------------------------------
    def records(self, pool: FdPool) -> list[TensorRecord]:
        """Every tensor of the state dict; contiguous ones as byte ranges of their storage
        record, strided views made contiguous on demand (numpy, no torch)."""
        fd = pool.get(self.path)
        out = []
        for p in self.params():
            ref = self.tensors[p.name]
            rec = self._storage_record(ref)
            item = DTYPE_SIZES.get(ref.dtype, 1)
            frozen = ref.is_parameter and not ref.requires_grad and ref.dtype in FLOAT_DTYPES
            if ref.stride == _contiguous_stride(ref.shape) or ref.numel <= 1:
                out.append(TensorRecord(p.name, p.dtype, p.shape, frozen, p.nbytes, fd,
                                        rec.offset + ref.offset * item))
            else:
                out.append(TensorRecord(p.name, p.dtype, p.shape, frozen, p.nbytes,
                                        load=_strided_loader(fd, rec, ref, self.display)))
        return out

    # -- tensors for the Python API ------------------------------------------------------
    def load_tensors(self) -> dict[str, Any]:
        """Real tensors (memory-mapped) keyed by name, through torch's own loader."""
        import torch

        try:
            root = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # torch raises many types for bad files
            raise CorruptFileError(f"{self.display}: torch.load failed: {exc}") from None
        node: Any = root
        for k in self.key_path:
            node = node[k]
        return {str(k): v for k, v in node.items() if isinstance(v, torch.Tensor)}


class UnsafePtSource:
    """A checkpoint that needs real unpickling (a full ``nn.Module``, a legacy file, custom
    objects). Only with ``--unsafe-load``: ``torch.load(weights_only=False)`` runs code from
    the file. Rewrites re-save the whole object with ``torch.save``."""

    format = "pt"
    unsafe = True

    def __init__(self, path: str, options: OpenOptions) -> None:
        import warnings

        import torch

        self.display = path
        self.path = Path(path)
        self.options = options
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.root = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as exc:  # arbitrary code ran; anything can come out
            raise CorruptFileError(f"{path}: torch.load failed: {type(exc).__name__}: "
                                   f"{exc}") from None
        self.module = self.root if isinstance(self.root, torch.nn.Module) else None
        if self.module is None:
            self.key_path, state = find_state_dict(
                self.root, lambda v: isinstance(v, torch.Tensor), options.key, path=path)
            self.state: dict[str, Any] = {str(k): v for k, v in state.items()
                                          if isinstance(v, torch.Tensor)}
            self.container = state

    def params(self) -> list[ParamInfo]:
        import torch

        from paramctl.tensors import module_params, tensor_info

        if self.module is not None:
            return module_params(self.module, buffers=True)
        tied = tied_groups(
            (name, (t.untyped_storage().data_ptr(), int(t.storage_offset()), tuple(t.shape)))
            for name, t in self.state.items())
        return [tensor_info(name, t, tied=tied[name], trainable=not (
                    isinstance(t, torch.nn.Parameter) and not t.requires_grad))
                for name, t in self.state.items()]

    def total_bytes(self) -> int:
        return sum(p.nbytes for p in self.params())

    def named_tensors(self) -> dict[str, Any]:
        if self.module is not None:
            return dict(self.module.state_dict(keep_vars=True))
        return self.state

    def records(self, pool: FdPool) -> list[TensorRecord]:
        """Tensors already in memory (torch unpickled them), serialised on demand."""
        tensors = self.named_tensors()

        def loader(name: str) -> Callable[[], bytes]:
            def load() -> bytes:
                from paramctl.tensors import tensor_bytes

                return tensor_bytes(tensors[name].detach())
            return load

        return [TensorRecord(p.name, p.dtype, p.shape,
                             not p.requires_grad and not p.buffer and p.dtype in FLOAT_DTYPES,
                             p.nbytes, load=loader(p.name))
                for p in self.params()]


def open_pt(path: str, options: OpenOptions) -> PtSource | UnsafePtSource:
    """The torch-free reader, or with ``--unsafe-load`` the real unpickler as a fallback."""
    try:
        return PtSource(path, options)
    except UnsafeFileError:
        if not options.unsafe_load:
            raise
        return UnsafePtSource(path, options)


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride = []
    acc = 1
    for d in reversed(shape):
        stride.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(stride))


def _strided_loader(fd: int, rec: Record, ref: TensorRef, display: str
                    ) -> Callable[[], bytes]:
    """The view's elements in row-major order, gathered from its storage with numpy."""
    def load() -> bytes:
        import numpy as np

        item = DTYPE_SIZES.get(ref.dtype, 1)
        storage = np.frombuffer(read_exact(fd, rec.size, rec.offset, f"{display}: {rec.name}"),
                                dtype=f"V{item}")
        view = np.lib.stride_tricks.as_strided(
            storage[ref.offset:], shape=ref.shape, strides=[s * item for s in ref.stride],
            writeable=False)
        return np.ascontiguousarray(view).tobytes()

    return load


register("pt", detect.pt, open_pt)
