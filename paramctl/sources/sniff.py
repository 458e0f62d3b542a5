"""Recognising a checkpoint by its first bytes, for names that say nothing (``.pth.tar``,
``.pkl``, ``model_best``).

Reads a few bytes at the start of the file; only a zip whose first record is not
``data.pkl`` costs one more read of its central directory (bounded). Never parses more than
that: the reader of the format found does the validating.
"""

from __future__ import annotations

import os
import struct

from paramctl.errors import SourceError
from paramctl.io.reader import ByteReader, open_reader

__all__ = ["sniff"]

_ZIP_LOCAL = b"PK\x03\x04"
_ZIP_CENTRAL = b"PK\x01\x02"
_ZIP_EOCD = b"PK\x05\x06"
# pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2): the magic number legacy (pre-1.6,
# non-zip) torch.save writes first. The pt reader explains it and --unsafe-load opens it.
_LEGACY_TORCH = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."
_GGUF = b"GGUF"
_MAX_CENTRAL = 16 << 20


def _is_pickle_name(name: bytes) -> bool:
    # torch.save writes ARCHIVE/data.pkl; the pt reader looks for exactly that shape.
    return name.endswith(b"/data.pkl") and name.count(b"/") == 1


def _zip_holds_pickle(reader: ByteReader) -> bool:
    """A ``*/data.pkl`` record: torch.save writes it first; otherwise look it up in the
    central directory (zip64 and oversized directories are not looked into)."""
    head = reader.pread(30 + 1024, 0)
    if len(head) >= 30:
        (name_len,) = struct.unpack_from("<H", head, 26)
        if _is_pickle_name(head[30:30 + name_len]):
            return True
    tail_len = min(reader.size, 22 + 0xFFFF)
    tail = reader.pread(tail_len, reader.size - tail_len)
    at = tail.rfind(_ZIP_EOCD)
    if at < 0 or at + 22 > len(tail):
        return False
    cd_size, cd_offset = struct.unpack_from("<II", tail, at + 12)
    if cd_size > _MAX_CENTRAL or cd_offset + cd_size > reader.size:
        return False
    central = reader.pread(cd_size, cd_offset)
    pos = 0
    while central.startswith(_ZIP_CENTRAL, pos) and pos + 46 <= len(central):
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", central, pos + 28)
        if _is_pickle_name(central[pos + 46:pos + 46 + name_len]):
            return True
        pos += 46 + name_len + extra_len + comment_len
    return False


def sniff(spec: str) -> str | None:
    """The format an existing regular file's content shows (``"pt"``, ``"safetensors"``,
    ``"gguf"``), or ``None`` when it shows none of them.

    >>> sniff("checkpoints/model_best.pth.tar")  # doctest: +SKIP
    'pt'
    """
    if not os.path.isfile(spec):
        return None
    try:
        reader = open_reader(spec)
    except SourceError:  # unreadable: the caller's "unknown type" message stands
        return None
    try:
        head = reader.pread(16, 0)
        if head.startswith(_ZIP_LOCAL):
            return "pt" if _zip_holds_pickle(reader) else None
        if head.startswith(_LEGACY_TORCH):
            return "pt"
        if head.startswith(_GGUF):
            return "gguf"
        if len(head) >= 9:
            (length,) = struct.unpack_from("<Q", head)
            if head[8:9] == b"{" and 2 <= length <= reader.size - 8:
                return "safetensors"
        return None
    finally:
        reader.close()
