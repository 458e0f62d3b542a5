"""Legacy (pre-1.6, non-zip) torch files, listed without torch and without running them.

``torch.save(obj, f, _use_new_zipfile_serialization=False)`` (torch/serialization.py
``_legacy_save``; read back by ``_legacy_load``) writes one stream of pickles and bytes:

1. the magic number ``0x1950a86a20f9469cfc6c``, 2. the protocol version ``1001``,
3. a sys-info dict (``little_endian``, C type sizes),
4. the object itself, where each storage is the persistent id ``("storage", <torch
   FloatStorage...>, key, location, numel, view)`` and each ``nn.Module`` class of a
   pickled module is ``("module", <class>, source file, source)``,
5. the sorted list of storage keys,
6. each storage's bytes in that order, each after its element count (little-endian int64).

Every pickle goes through the same restricted machine as a zip's ``data.pkl`` (inert
placeholders, no import, no call), the storages become records at their offsets in the
file, and the rest is :class:`~paramctl.sources.pt.PtSource` unchanged (its
``LegacyPtSource``; this module only parses).

Rewriting in place is refused: pickle and data are one stream, and paramctl's torch
writers rewrite zip archives. ``-o OUT.pt`` (a zip checkpoint) or ``-o OUT.safetensors``
write the state dict with its flags to a new file.
"""

from __future__ import annotations

import mmap
from typing import Any

from paramctl.errors import CorruptFileError, UnsafeFileError
from paramctl.formats.zip import Record
from paramctl.model import DTYPE_SIZES
from paramctl.sources.pickle_vm import (
    Global,
    ParsedPickle,
    StorageRef,
    _Machine,
    _short,
    parse_pickle,
)

__all__ = ["MAGIC_NUMBER", "PROTOCOL_VERSION", "read_legacy"]

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
_NO_DATE = (1980, 1, 1, 0, 0, 0)
_HEAD_BYTES = 1 << 16  # torch's three header pickles take about 140 bytes


class _LegacyMachine(_Machine):
    """Legacy persistent ids: a 6-tuple storage id, or a module class (kept a name)."""

    def op_BINPERSID(self, arg: Any, pos: int, end: int) -> None:
        pid, start = self.pop()
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module":
            # torch compares the class's saved source with the current one, then uses
            # the class: here it stays a name, and the module an inert placeholder.
            if not isinstance(pid[1], Global):
                raise CorruptFileError("malformed module class id in legacy torch pickle")
            self.push(pid[1], start)
            return
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise CorruptFileError(f"unknown persistent id in pickle: {_short(pid)}")
        if pid[5] is not None:
            raise UnsafeFileError("the legacy file holds a storage view, which paramctl does "
                                  "not read; if you trust the file, pass --unsafe-load")
        ref = self._storage(pid[:5])
        seen = self.storages.setdefault(ref.key, ref)
        if (seen.dtype, seen.numel, seen.untyped) != (ref.dtype, ref.numel, ref.untyped):
            raise CorruptFileError(f"storage {_short(ref.key)} is described two ways")
        self.push(ref, start)


def read_legacy(path: str, data: mmap.mmap) -> tuple[ParsedPickle, dict[str, Record], bytes]:
    """Parse a legacy file mapped as ``data``: the object's pickle, its storages as records
    at their offsets in the file (named ``data/<key>``, as in a zip), and the bytes up to
    the end of the object's pickle (what the spans point into)."""
    # The three small header pickles come first: read them from the head alone, so a
    # large pickle of something else is refused before it is parsed.
    head = data[:_HEAD_BYTES]
    try:
        try:
            magic = parse_pickle(head, trailing=True)
        except CorruptFileError:
            magic = None
        if magic is None or magic.root != MAGIC_NUMBER or isinstance(magic.root, bool):
            raise CorruptFileError("not a torch checkpoint (neither a zip archive nor the "
                                   "legacy format: no magic number)")
        version = parse_pickle(head, start=magic.end, trailing=True)
        if version.root != PROTOCOL_VERSION or isinstance(version.root, bool):
            raise CorruptFileError(f"legacy torch file of unknown protocol version "
                                   f"{_short(version.root)}")
        info = parse_pickle(head, start=version.end, trailing=True)
        if not isinstance(info.root, dict) or info.root.get("little_endian") is not True:
            raise UnsafeFileError("a big-endian (or unlabelled) legacy torch file; "
                                  "paramctl reads little-endian ones. If you trust the "
                                  "file, pass --unsafe-load")
        parsed = parse_pickle(data, _LegacyMachine, start=info.end, trailing=True)
        keys = parse_pickle(data, start=parsed.end, trailing=True)
        by_name = _storage_records(parsed, keys.root, keys.end, data)
    except (UnsafeFileError, CorruptFileError) as exc:
        raise type(exc)(f"{path}: {exc}") from None
    return parsed, by_name, data[:parsed.end]


def _storage_records(parsed: ParsedPickle, keys: Any, offset: int, data: mmap.mmap
                     ) -> dict[str, Record]:
    storages: dict[str, StorageRef] = parsed.storages
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CorruptFileError("malformed storage key list in legacy torch file")
    if set(keys) != set(storages) or len(keys) != len(storages):
        raise CorruptFileError("the storage key list does not match the storages the "
                               "object refers to")
    records: dict[str, Record] = {}
    for key in keys:
        ref = storages[key]
        unit = 1 if ref.untyped else DTYPE_SIZES.get(ref.dtype)
        if unit is None:
            raise CorruptFileError(f"storage {_short(key)} has unknown dtype {ref.dtype}")
        if offset + 8 > len(data):
            raise CorruptFileError(f"truncated: storage {_short(key)} is missing")
        count = int.from_bytes(data[offset:offset + 8], "little", signed=True)
        if count != ref.numel:
            raise CorruptFileError(f"storage {_short(key)} holds {count} elements, but "
                                   f"the pickle says {ref.numel}")
        start, size = offset + 8, count * unit
        if start + size > len(data):
            raise CorruptFileError(f"truncated: storage {_short(key)} is cut off")
        name = f"data/{key}"
        records[name] = Record(name, start, size, 0, _NO_DATE)
        offset = start + size
    return records
