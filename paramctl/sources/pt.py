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

import os
import stat
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from paramctl.errors import CorruptFileError, OperationError, SourceError, UnsafeFileError
from paramctl.fileio import atomic_write, file_identity, locked
from paramctl.model import DTYPE_SIZES, FLOAT_DTYPES, ParamInfo, tied_groups
from paramctl.sources.base import Edit, OpenOptions, register
from paramctl.sources.pickle_vm import ParsedPickle, TensorRef, parse_pickle
from paramctl.sources.pickled_module import find_tensors
from paramctl.sources.statedict import find_state_dict
from paramctl.sources.zipio import NewRecord, Record, read_records, write_zip

__all__ = ["EXTENSIONS", "PtSource", "open_file"]

EXTENSIONS = (".pt", ".pth", ".bin", ".ckpt")
MAX_PICKLE_BYTES = 1 << 30
_ZIP_MAGIC = b"PK\x03\x04"

_NEWTRUE = b"\x88"
_NEWFALSE = b"\x89"
_PARAM_PREFIX = b"ctorch._utils\n_rebuild_parameter\n"
_PARAM_SUFFIX_FROZEN = b"\x89ccollections\nOrderedDict\n)R\x87R"


def open_file(path: str) -> tuple[int, int]:
    """Open a regular file for reading; return ``(fd, size)`` or a one-line error."""
    try:
        # O_NONBLOCK: opening a FIFO or device named like a checkpoint must not hang.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise SourceError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise SourceError(f"{path} is a directory, not a checkpoint file") from None
    except OSError as exc:
        raise SourceError(f"cannot open {path}: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise SourceError(f"{path} is not a regular file")
    return fd, st.st_size


def is_legacy(head: bytes) -> bool:
    """Whether a file starting with ``head`` may be a legacy (pre-1.6, non-zip) torch file:
    a pickle (protocol 2 or later, as every torch release wrote) rather than a zip."""
    return head[:1] == b"\x80"


def _classify_non_zip(path: str, head: bytes, fd: int) -> SourceError:
    if not head:
        return CorruptFileError(f"{path}: the file is empty")
    if is_legacy(head):  # open_pt reads these with the legacy reader
        return CorruptFileError(f"{path}: legacy (pre-1.6, non-zip) torch format, not a zip "
                                "archive")
    if head.startswith(b"PK"):
        return CorruptFileError(f"{path}: damaged zip archive")
    return CorruptFileError(f"{path}: not a torch checkpoint (not a zip archive)")


class PtSource:
    """A torch zip checkpoint; ``state`` is everything parsed from it."""

    format = "pt"

    def __init__(self, path: str, options: OpenOptions) -> None:
        self.display = path
        self.path = Path(path)
        self.options = options
        fd, size = open_file(path)
        try:
            self.identity = file_identity(os.fstat(fd))
            head = os.pread(fd, 4, 0)
            if head != _ZIP_MAGIC:
                raise _classify_non_zip(path, head, fd)
            self.records = read_records(fd, path, size)
            self.pickle_record = self._find_pickle(path)
            # From the same fd as the records: never a pickle of some other file.
            self.pickle_bytes = os.pread(fd, self.pickle_record.size, self.pickle_record.offset)
        finally:
            os.close(fd)
        if len(self.pickle_bytes) != self.pickle_record.size:
            raise CorruptFileError(f"{path}: truncated data.pkl")
        self.file_size = size
        self.prefix = self.pickle_record.name[: -len("data.pkl")]
        self.by_name = {r.name: r for r in self.records}
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

    # -- reading -----------------------------------------------------------------------
    def _find_pickle(self, path: str) -> Record:
        names = [r.name for r in self.records]
        pkl = next((r for r in self.records if r.name.endswith("data.pkl")
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
        return out

    @staticmethod
    def _identity(ref: TensorRef) -> tuple[Any, ...]:
        return (ref.storage.key, ref.offset, ref.shape, ref.stride, ref.dtype)

    def total_bytes(self) -> int:
        return self.file_size

    # -- writing -----------------------------------------------------------------------
    def _pickle_edits(self, flags: Mapping[str, bool]) -> bytes:
        splices: dict[int, tuple[int, bytes]] = {}  # start -> (end, replacement)
        inserts: dict[int, list[bytes]] = {}
        done: set[int] = set()
        for name, want in flags.items():
            ref = self.tensors[name]
            if id(ref) in done:
                continue
            done.add(id(ref))
            if ref.is_parameter:
                if ref.requires_grad == want:
                    continue
                if ref.grad_span is None:
                    raise OperationError(f"{self.display}: cannot locate requires_grad of "
                                         f"{name!r} in the pickle")
                start, end = ref.grad_span
                splices[start] = (end, _NEWTRUE if want else _NEWFALSE)
            elif not want:
                start, end = ref.span
                inserts.setdefault(start, []).append(_PARAM_PREFIX)
                inserts.setdefault(end, []).insert(0, _PARAM_SUFFIX_FROZEN)
        if not splices and not inserts:
            return self.pickle_bytes
        for start, end in self.parsed.frames:
            splices[start] = (end, b"")
        data = self.pickle_bytes
        pieces: list[bytes] = []
        cursor = 0
        for pos in sorted(set(splices) | set(inserts)):
            if pos < cursor:
                raise OperationError(f"{self.display}: overlapping tensor definitions in the "
                                     "pickle; cannot rewrite it safely")
            pieces.append(data[cursor:pos])
            cursor = pos
            # Suffixes close the previous expression first, then prefixes open the next.
            pieces.extend(inserts.get(pos, []))
            if pos in splices:
                end, repl = splices[pos]
                pieces.append(repl)
                cursor = end
        pieces.append(data[cursor:])
        return b"".join(pieces)

    def _init_record(self, src_fd: int, rec: Record, names: list[str],
                     init_fn: Callable[[str, Any], None]) -> Callable[[], NewRecord]:
        def build() -> NewRecord:
            from paramctl.tensors import frombuffer

            buf = bytearray(os.pread(src_fd, rec.size, rec.offset))
            if len(buf) != rec.size:
                raise CorruptFileError(f"{self.display}: truncated record {rec.name}")
            seen: set[tuple[Any, ...]] = set()
            for name in names:
                ref = self.tensors[name]
                ident = self._identity(ref)
                if ident in seen:
                    continue
                seen.add(ident)
                base = frombuffer(buf, ref.dtype)
                view = base.as_strided(ref.shape, ref.stride, ref.offset)
                init_fn(name, view)
            return NewRecord(buf, zlib.crc32(buf))

        return build

    def _alignment(self, fd: int) -> int:
        rec = self.by_name.get(f"{self.prefix}.storage_alignment")
        if rec is None or rec.size > 16:
            return 64
        try:
            value = int(os.pread(fd, rec.size, rec.offset).decode())
        except ValueError:
            return 64
        return value if 0 < value <= 1 << 16 and value & (value - 1) == 0 else 64

    def write(self, edit: Edit, out: Path | None,
              progress: Callable[[int], None] | None = None) -> Path:
        target = out or self.path
        if out is not None and out.suffix.lower() not in EXTENSIONS:
            from paramctl.convert import convert

            return convert(self, edit, out, progress)
        with locked(self.path, expect=self.identity) as fd:
            if fd is None:
                raise SourceError(f"{self.display} disappeared while paramctl was reading it")
            new_pickle = self._pickle_edits(edit.requires_grad)
            replacements: dict[str, NewRecord | Callable[[], NewRecord]] = {}
            if new_pickle is not self.pickle_bytes:
                replacements[self.pickle_record.name] = NewRecord(new_pickle)
            if edit.init:
                if edit.init_fn is None:
                    raise AssertionError("init without init_fn")
                by_record: dict[str, list[str]] = {}
                for name in edit.init:
                    rec = self._storage_record(self.tensors[name])
                    by_record.setdefault(rec.name, []).append(name)
                for rec_name, names in by_record.items():
                    replacements[rec_name] = self._init_record(
                        fd, self.by_name[rec_name], sorted(names), edit.init_fn)
            align = self._alignment(fd)
            with atomic_write(target, mode_from=self.path) as dst:
                write_zip(fd, dst.fileno(), self.records, replacements, align=align,
                          progress=progress)
        return target

    # -- tensors for the Python API ------------------------------------------------------
    def load_tensors(self) -> dict[str, Any]:
        """The state dict's tensors keyed by name, made from the stored bytes the reader
        located (the pickle is not run again, by torch or anyone): views of a private
        copy-on-write mapping of the file, so nothing is read before it is used, and tied
        names share memory as they did when saved."""
        import mmap

        import torch

        from paramctl.tensors import torch_dtype

        fd, size = open_file(str(self.path))
        try:
            if file_identity(os.fstat(fd)) != self.identity:
                raise SourceError(f"{self.display} changed while paramctl was reading it")
            mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY) if size else None
        finally:
            os.close(fd)
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

        from paramctl.sources.module import module_params, tensor_info

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

    def write(self, edit: Edit, out: Path | None,
              progress: Callable[[int], None] | None = None) -> Path:
        import torch

        target = out or self.path
        if self.module is not None:
            from paramctl.api import apply_edit

            apply_edit(self.module, edit)
        else:
            for name in sorted(edit.init):
                if edit.init_fn is not None:
                    with torch.no_grad():
                        edit.init_fn(name, self.state[name].data)
            for name, want in edit.requires_grad.items():
                t = self.state[name]
                param = torch.nn.Parameter(t.detach(), requires_grad=want)
                self.container[name] = param  # type: ignore[index]
        with locked(self.path), atomic_write(target, mode_from=self.path) as fh:
            torch.save(self.root, fh)
        return target


def open_pt(path: str, options: OpenOptions) -> PtSource | UnsafePtSource:
    """The torch-free reader (zip or legacy format), or with ``--unsafe-load`` the real
    unpickler as a fallback for what that reader cannot parse."""
    try:
        fd, _ = open_file(path)
        try:
            head = os.pread(fd, 4, 0)
        finally:
            os.close(fd)
        if is_legacy(head):
            from paramctl.sources.pt_legacy import LegacyPtSource

            return LegacyPtSource(path, options)
        return PtSource(path, options)
    except UnsafeFileError:
        if not options.unsafe_load:
            raise
        return UnsafePtSource(path, options)


def _detect(spec: str) -> bool:
    return spec.lower().endswith(EXTENSIONS) and not os.path.isdir(spec) and (
        os.path.exists(spec) or ":" not in spec
    )


register("pt", _detect, open_pt)
