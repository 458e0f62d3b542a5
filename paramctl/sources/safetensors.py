"""``.safetensors`` files, read from the header alone (the layout: ``formats/safetensors``).

The frozen state lives in ``__metadata__["paramctl.frozen"]``; rewriting is
``writers/safetensors.py``'s job.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from paramctl.errors import CorruptFileError, SourceError
from paramctl.formats.safetensors import Header, TensorEntry, header_records, read_header
from paramctl.io.files import FdPool
from paramctl.io.reader import LocalReader, is_remote, open_reader
from paramctl.model import FLOAT_DTYPES, Edit, ParamInfo, TensorRecord, mark_buffers
from paramctl.sources import detect
from paramctl.sources.adapter import adapter_extra
from paramctl.sources.base import OpenOptions, local_only, register

__all__ = ["SafetensorsSource"]


class SafetensorsSource:
    format = "safetensors"

    def __init__(self, path: str, options: OpenOptions) -> None:
        self.display = path
        self.path = Path(path)
        self.remote = is_remote(path)
        if options.key:
            raise SourceError("--key applies to torch checkpoints; a safetensors file holds "
                              "one flat set of tensors")
        reader = open_reader(path)
        try:
            self.identity = reader.identity if isinstance(reader, LocalReader) else None
            self.header: Header = read_header(reader)
            self.file_size = reader.size
        finally:
            reader.close()
        self.entries = {e.name: e for e in self.header.tensors}
        try:
            self.frozen = self.header.frozen
        except CorruptFileError as exc:
            raise CorruptFileError(f"{path}: {exc}") from None

    def params(self) -> list[ParamInfo]:
        frozen, prod = self.frozen, math.prod
        # Positional arguments and unpacked entries: this runs once per tensor, 100,000
        # times for a large mixture-of-experts header.
        return mark_buffers(
            [ParamInfo(name, shape, dtype, prod(shape), end - begin,
                       dtype in FLOAT_DTYPES and name not in frozen)
             for name, dtype, shape, begin, end in self.header.tensors])

    def total_bytes(self) -> int:
        return self.file_size

    def extra(self) -> dict[str, Any] | None:
        """``{"adapter": ...}`` for a PEFT ``adapter_model.safetensors``."""
        return None if self.remote else adapter_extra(self.path)

    def new_frozen(self, edit: Edit) -> set[str]:
        return edit.frozen_after(self.frozen, self.entries)

    def records(self, pool: FdPool) -> list[TensorRecord]:
        """Tensors in file order (the order their bytes are stored)."""
        local_only(self.display, self.remote)
        return header_records(pool.get(self.path), self.header, self.frozen)

    def entry(self, name: str) -> TensorEntry:
        return self.entries[name]

    def load_tensors(self) -> dict[str, Any]:
        from safetensors.torch import load_file

        local_only(self.display, self.remote)
        try:
            return dict(load_file(str(self.path)))
        except Exception as exc:  # the Rust loader raises its own error type
            raise CorruptFileError(f"{self.display}: {exc}") from None


register("safetensors", detect.safetensors, SafetensorsSource)
