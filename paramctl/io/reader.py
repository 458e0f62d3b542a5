"""One small reader interface for every byte a format reader needs.

A format module opens its input with :func:`open_reader` and asks for byte ranges with
``pread``; it never learns whether the bytes come from a local file or from somewhere
else. Local files are the built-in scheme; other schemes register an opener with
:func:`register_scheme`, so adding one touches no format module (:mod:`paramctl.io.hub`
registers ``https://``, ``http://`` and ``hf://``).
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable
from typing import Protocol
from urllib.parse import urlsplit

from paramctl.errors import CorruptFileError, SourceError
from paramctl.io.files import FileIdentity, file_identity

__all__ = [
    "ByteReader",
    "LocalReader",
    "ReaderFile",
    "is_remote",
    "join",
    "open_reader",
    "register_scheme",
    "spec_name",
]


class ByteReader(Protocol):
    """Random access to the bytes of one file."""

    name: str  # how messages name it
    size: int

    def pread(self, n: int, offset: int) -> bytes:
        """Up to ``n`` bytes at ``offset`` (fewer only at the end of the file)."""
        ...

    def close(self) -> None: ...


class LocalReader:
    """A regular local file, opened once; ``fd`` serves in-kernel copies and locks."""

    def __init__(self, path: str) -> None:
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
        self.name = path
        self.fd = fd
        self.size = st.st_size
        self.identity: FileIdentity = file_identity(st)

    def pread(self, n: int, offset: int) -> bytes:
        try:
            return os.pread(self.fd, n, offset)
        except OSError as exc:
            raise CorruptFileError(f"{self.name}: read failed: {exc.strerror}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> LocalReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ReaderFile(io.RawIOBase):
    """A read-only, seekable file object over a :class:`ByteReader` (for :mod:`zipfile`)."""

    def __init__(self, reader: ByteReader) -> None:
        self.reader = reader
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.reader.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.reader.pread(min(len(buffer), max(0, self.reader.size - self.pos)),
                                 self.pos)
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


SchemeOpener = Callable[[str], ByteReader]
_SCHEMES: dict[str, SchemeOpener] = {}


def register_scheme(prefix: str, opener: SchemeOpener) -> None:
    """Route specs starting with ``prefix`` (e.g. ``"https://"``) to ``opener``."""
    _SCHEMES[prefix] = opener


def join(base: str, name: str) -> str:
    """``name`` (a file of a checkpoint folder, e.g. a shard) next to ``base``, local or
    remote."""
    if is_remote(base):
        return base.rstrip("/") + "/" + name
    return os.path.join(base, name)


def is_remote(spec: str) -> bool:
    return spec.startswith(("http://", "https://", "hf://"))


def spec_name(spec: str) -> str:
    """What a format detector matches suffixes against: a URL's path (its query left
    out), or the local path itself."""
    return urlsplit(spec).path if is_remote(spec) else spec


def open_reader(spec: str) -> ByteReader:
    """A reader for a local path, or for a spec of a registered scheme."""
    for prefix, opener in _SCHEMES.items():
        if spec.startswith(prefix):
            return opener(spec)
    return LocalReader(spec)
