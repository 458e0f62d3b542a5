"""torch zip checkpoints (``.pt .pth .bin .ckpt``), read and rewritten without torch.

Reading runs :mod:`paramctl.sources.pickle_vm` over ``data.pkl``: objects beside the
tensors (hyper-parameters, numpy scalars, a user's config class) are inert placeholders,
and a whole pickled ``nn.Module`` is walked (:mod:`paramctl.sources.pickled_module`).
Legacy (pre-1.6, non-zip) files are read by :mod:`paramctl.sources.pt_legacy`.

Freezing splices the pickle: a plain tensor entry becomes
``torch._utils._rebuild_parameter(<tensor>, False, OrderedDict())`` (exactly what
``torch.save`` writes for a frozen ``nn.Parameter``), an existing Parameter (a module's,
too) has its ``requires_grad`` byte flipped. Every other pickle byte and every
tensor record is copied unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from paramctl.errors import CorruptFileError, SourceError, UnsafeFileError
from paramctl.formats import PT_EXTENSIONS, contiguous_stride
from paramctl.formats.zip import Record, read_records
from paramctl.io.files import FdPool, read_exact
from paramctl.io.reader import ByteReader, LocalReader, is_remote, open_reader
from paramctl.model import (
    DTYPE_SIZES,
    FLOAT_DTYPES,
    ParamInfo,
    TensorRecord,
    mark_buffers,
    tied_groups,
)
from paramctl.sources import detect
from paramctl.sources.adapter import adapter_extra
from paramctl.sources.base import OpenOptions, local_only, register
from paramctl.sources.pickle_vm import ParsedPickle, TensorRef, parse_pickle
from paramctl.sources.pickled_module import find_tensors
from paramctl.sources.statedict import find_state_dict

__all__ = ["EXTENSIONS", "PtSource", "UnsafePtSource", "open_pt"]

EXTENSIONS = PT_EXTENSIONS
MAX_PICKLE_BYTES = 1 << 30
_ZIP_MAGIC = b"PK\x03\x04"
# How much of a legacy (non-zip) file is scanned for its globals; its pickles come first.
_LEGACY_SCAN = 64 << 20
_LEGACY_SCAN_REMOTE = 1 << 20


def _is_pickle(name: str) -> bool:
    """The main pickle of a torch zip: ``<archive>/data.pkl``."""
    return name.endswith("data.pkl") and name.count("/") == 1


def is_legacy(head: bytes) -> bool:
    """Whether a file starting with ``head`` may be a legacy (pre-1.6, non-zip) torch file:
    a pickle (protocol 2 or later, as every torch release wrote) rather than a zip."""
    return head[:1] == b"\x80"


def _classify_non_zip(path: str, head: bytes, reader: ByteReader) -> SourceError:
    if not head:
        return CorruptFileError(f"{path}: the file is empty")
    if is_legacy(head):  # open_pt reads local ones with the legacy reader
        return UnsafeFileError(f"{path}: legacy (pre-1.6, non-zip) torch format, read only "
                               "from a local file: download it first")
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
            # Remotely, each record's local header would cost a request (they lie between
            # the tensors); listing needs only data.pkl's, so only that one is located.
            self.zip_records = read_records(reader,
                                            locate=_is_pickle if self.remote else None)
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
        self._find_tensors(path, options)
        self._check_storages()

    def _find_tensors(self, path: str, options: OpenOptions) -> None:
        found = find_tensors(self.parsed.root, options.key, path=path, data=self.pickle_bytes)
        self.key_path = found.key_path
        self.tensors: dict[str, TensorRef] = found.tensors
        # Known from the file itself (a pickled module, a keep_vars state dict): never
        # trainable, never frozen.
        self.buffers = found.buffers
        self.non_persistent = found.non_persistent  # listed, but no part of a state dict
        self.from_module = found.module
        # Where each entry of the state dict is in the pickle (renames and drops splice it).
        self.entry_spans = self.parsed.entries.get(found.state_id, {}) if found.state_id \
            else {}
        # Only tensors, directly under the root: a fresh state dict loses nothing.
        self.plain = (not self.key_path and not found.module
                      and len(self.tensors) == found.state_size)

    # -- reading -----------------------------------------------------------------------
    def _find_pickle(self, path: str) -> Record:
        names = [r.name for r in self.zip_records]
        pkl = next((r for r in self.zip_records if _is_pickle(r.name)), None)
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
            buffer = name in self.buffers
            out.append(ParamInfo(
                name=name,
                shape=ref.shape,
                dtype=ref.dtype,
                numel=ref.numel,
                nbytes=ref.numel * DTYPE_SIZES.get(ref.dtype, 1),
                requires_grad=ref.dtype in FLOAT_DTYPES and not frozen and not buffer,
                buffer=buffer,
                tied=tied[name],
            ))
        return mark_buffers(out)

    @staticmethod
    def _identity(ref: TensorRef) -> tuple[Any, ...]:
        return (ref.storage.key, ref.offset, ref.shape, ref.stride, ref.dtype)

    def total_bytes(self) -> int:
        return self.file_size

    def extra(self) -> dict[str, Any] | None:
        """``{"adapter": ...}`` for a PEFT ``adapter_model.bin``."""
        return None if self.remote else adapter_extra(self.path)

    # -- tensor bytes ------------------------------------------------------------------
    def records(self, pool: FdPool) -> list[TensorRecord]:
        """Every tensor of the state dict; contiguous ones as byte ranges of their storage
        record, strided views made contiguous on demand (numpy, no torch)."""
        local_only(self.display, self.remote)
        fd = pool.get(self.path)
        out = []
        for p in self.params():
            ref = self.tensors[p.name]
            rec = self._storage_record(ref)
            item = DTYPE_SIZES.get(ref.dtype, 1)
            frozen = ref.is_parameter and not ref.requires_grad and ref.dtype in FLOAT_DTYPES
            if ref.stride == contiguous_stride(ref.shape) or ref.numel <= 1:
                out.append(TensorRecord(p.name, p.dtype, p.shape, frozen, p.nbytes, fd,
                                        rec.offset + ref.offset * item))
            else:
                out.append(TensorRecord(p.name, p.dtype, p.shape, frozen, p.nbytes,
                                        load=_strided_loader(fd, rec, ref, self.display)))
        return out

    # -- tensors for the Python API ------------------------------------------------------
    def load_tensors(self) -> dict[str, Any]:
        """The state dict's tensors keyed by name, made from the stored bytes the reader
        located (the pickle is not run again, by torch or anyone): views of a private
        copy-on-write mapping of the file, so nothing is read before it is used, and tied
        names share memory as they did when saved."""
        import mmap

        local_only(self.display, self.remote)

        import torch

        from paramctl.tensors import torch_dtype

        with LocalReader(str(self.path)) as reader:
            if reader.identity != self.identity:
                raise SourceError(f"{self.display} changed while paramctl was reading it")
            mapped = mmap.mmap(reader.fd, 0, access=mmap.ACCESS_COPY) if reader.size \
                else None
        bases: dict[str, torch.Tensor] = {}
        out: dict[str, Any] = {}
        for name, ref in self.tensors.items():
            if name in self.non_persistent:
                continue
            rec = self._storage_record(ref)
            base = bases.get(rec.name)
            if base is None:
                base = torch.empty(0, dtype=torch.uint8) if not rec.size or mapped is None \
                    else torch.frombuffer(mapped, dtype=torch.uint8, count=rec.size,
                                          offset=rec.offset)
                bases[rec.name] = base
            out[name] = base.view(torch_dtype(ref.dtype)).as_strided(
                ref.shape, ref.stride, ref.offset)
        return out


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
        return mark_buffers(
            tensor_info(name, t, tied=tied[name], trainable=not (
                isinstance(t, torch.nn.Parameter) and not t.requires_grad))
            for name, t in self.state.items())

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


class LegacyPtSource(PtSource):
    """A legacy (pre-1.6, non-zip) torch file (:mod:`paramctl.sources.pt_legacy` parses
    it): listed like a zip checkpoint, written only to a new file."""

    format = "pt"
    # Pickle and data are one stream: written only to a new file, through a conversion
    # (writers refuse an in-place rewrite).
    legacy = True

    def __init__(self, path: str, options: OpenOptions) -> None:
        import mmap

        from paramctl.sources.pt_legacy import read_legacy

        self.display = path
        self.path = Path(path)
        self.options = options
        self.remote = False
        with LocalReader(path) as reader:
            self.identity = reader.identity
            size = reader.size
            if size == 0:
                raise CorruptFileError(f"{path}: the file is empty")
            with mmap.mmap(reader.fd, 0, access=mmap.ACCESS_READ) as data:
                self.parsed, self.by_name, self.pickle_bytes = read_legacy(path, data)
        self.prefix = ""
        self.zip_records = list(self.by_name.values())
        self._find_tensors(path, options)
        self.file_size = size
        self._check_storages()

    def conversion_warnings(self, out: Path) -> list[str]:
        if self.from_module and not self.key_path:
            return [f"{out} holds the pickled module's parameters and buffers as a state "
                    "dict; the module object itself is not carried over"]
        return []


def _head(path: str) -> bytes:
    with LocalReader(path) as reader:
        return reader.pread(4, 0)


def open_pt(path: str, options: OpenOptions) -> PtSource | UnsafePtSource:
    """The torch-free reader (zip or legacy format), or with ``--unsafe-load`` the real
    unpickler as a fallback for what that reader cannot parse."""
    try:
        # A remote file is read through one reader (its first range holds the head too):
        # legacy files are local only.
        if not is_remote(path) and is_legacy(_head(path)):
            return LegacyPtSource(path, options)
        return PtSource(path, options)
    except UnsafeFileError:
        if not options.unsafe_load:
            raise
        local_only(path, is_remote(path))
        return UnsafePtSource(path, options)


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
