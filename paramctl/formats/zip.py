"""The zip container that ``torch.save`` writes: reading its directory, streaming a rewrite.

torch stores every record uncompressed and pads each local header with an ``FB`` extra
field so record data starts on a 64-byte boundary (``torch.load(mmap=True)`` relies on
it). :func:`write_zip` keeps that layout, copies unchanged records with
:func:`paramctl.io.files.copy_range` and recomputes nothing it does not need to.
"""

from __future__ import annotations

import itertools
import os
import struct
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from paramctl.errors import CorruptFileError
from paramctl.io.files import Progress, copy_range, write_all
from paramctl.io.reader import ByteReader, ReaderFile

__all__ = ["NewRecord", "Record", "read_records", "write_zip"]

_LOCAL = struct.Struct("<IHHHHHIIIHH")
_LOCAL_SIG = 0x04034B50
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_CENTRAL_SIG = 0x02014B50
_EOCD = struct.Struct("<IHHHHIIH")
_EOCD64 = struct.Struct("<IQHHIIQQQQ")
_LOCATOR64 = struct.Struct("<IIQI")
_U32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Record:
    """One stored zip entry: where its bytes are and what the central directory says."""

    name: str
    offset: int  # of the data, not of the header
    size: int
    crc: int
    date_time: tuple[int, int, int, int, int, int]


@dataclass(frozen=True)
class NewRecord:
    """Replacement content for a record: bytes already in memory."""

    data: bytes | bytearray | memoryview
    crc: int | None = None


def read_records(reader: ByteReader, *,
                 locate: Callable[[str], bool] | None = None) -> list[Record]:
    """List the records of a torch zip in file order, validating what the writer relies on.

    Reads the end-of-central-directory, the central directory and each local header
    (a few hundred bytes per record), never record data. ``locate`` limits which local
    headers are read (by record name): the others keep ``offset == -1`` (not located), and
    their bytes must not be read; a listing needs only the pickle's.
    """
    path, file_size = reader.name, reader.size
    try:
        with ReaderFile(reader) as fh, zipfile.ZipFile(fh) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError,
            struct.error, NotImplementedError) as exc:  # e.g. "zip file version 7.5"
        raise CorruptFileError(f"{path}: not a valid torch zip checkpoint ({exc})") from None
    records: list[Record] = []
    seen: set[str] = set()
    for info in infos:
        # Names come from the file: quote them so a message stays on one line.
        name = repr(info.filename)
        if info.compress_type != zipfile.ZIP_STORED:
            raise CorruptFileError(f"{path}: record {name} is compressed; torch "
                                   "checkpoints store records uncompressed")
        # torch never encrypts and never writes a name twice: either means damage.
        if info.flag_bits & 0x1:
            raise CorruptFileError(_encrypted(path, name))
        if info.filename in seen:
            raise CorruptFileError(f"{path}: record {name} appears twice: the file is "
                                   "corrupt (torch writes each record once)")
        seen.add(info.filename)
        if not 0 <= info.header_offset <= file_size - _LOCAL.size:
            raise CorruptFileError(f"{path}: truncated (record {name} is cut off)")
        if locate is not None and not locate(info.filename):
            if info.header_offset + _LOCAL.size + info.file_size > file_size:
                raise CorruptFileError(f"{path}: truncated (record {name} extends past "
                                       "the end of the file)")
            records.append(Record(info.filename, -1, info.file_size, info.CRC,
                                  info.date_time))
            continue
        header = reader.pread(_LOCAL.size, info.header_offset)
        if len(header) < _LOCAL.size:
            raise CorruptFileError(f"{path}: truncated (record {name} is cut off)")
        fields = _LOCAL.unpack(header)
        if fields[0] != _LOCAL_SIG:
            raise CorruptFileError(f"{path}: bad local header for record {name}: the file "
                                   "is corrupt")
        if fields[2] & 0x1:
            raise CorruptFileError(_encrypted(path, name))
        if info.compress_size != info.file_size:
            # A stored (uncompressed) record has one size; two differing ones is damage.
            raise CorruptFileError(
                f"{path}: record {name} has two different sizes ({info.compress_size} "
                f"stored, {info.file_size} uncompressed) though it is not compressed: the "
                "file is corrupt")
        data_offset = info.header_offset + _LOCAL.size + fields[9] + fields[10]
        if data_offset + info.file_size > file_size:
            raise CorruptFileError(f"{path}: truncated (record {name} extends past "
                                   "the end of the file)")
        records.append(Record(info.filename, data_offset, info.file_size, info.CRC,
                              info.date_time))
    records.sort(key=lambda r: r.offset)
    for prev, cur in itertools.pairwise(r for r in records if r.offset >= 0):
        if prev.offset + prev.size > cur.offset:
            raise CorruptFileError(f"{path}: records {prev.name!r} and {cur.name!r} overlap: "
                                   "the file is corrupt")
    return records


def _encrypted(path: str, name: str) -> str:
    return (f"{path}: record {name} has the encryption flag set: the file is corrupt "
            "(torch never encrypts records)")


def _dos_time(dt: tuple[int, int, int, int, int, int]) -> tuple[int, int]:
    year, month, day, hour, minute, second = dt
    year = max(1980, min(2107, year))
    date = ((year - 1980) << 9) | (month << 5) | day
    time = (hour << 11) | (minute << 5) | (second // 2)
    return time & 0xFFFF, date & 0xFFFF


def _local_header(name: bytes, size: int, crc: int, cursor: int, dt: tuple[int, ...],
                  align: int) -> bytes:
    zip64 = size >= _U32 or cursor >= _U32
    extra = b""
    if zip64:
        extra = struct.pack("<HHQQ", 1, 16, size, size)
    start = cursor + _LOCAL.size + len(name) + len(extra) + 4
    pad = (-start) % align
    extra += b"FB" + struct.pack("<H", pad) + b"Z" * pad
    time, date = _dos_time(dt)  # type: ignore[arg-type]
    size32 = _U32 if zip64 else size
    header = _LOCAL.pack(_LOCAL_SIG, 45 if zip64 else 20, 0, 0, time, date, crc, size32,
                         size32, len(name), len(extra))
    return header + name + extra


def _central_entry(name: bytes, size: int, crc: int, header_offset: int,
                   dt: tuple[int, ...]) -> bytes:
    extra_fields: list[int] = []
    size32 = size
    offset32 = header_offset
    if size >= _U32:
        extra_fields += [size, size]
        size32 = _U32
    if header_offset >= _U32:
        extra_fields.append(header_offset)
        offset32 = _U32
    extra = b""
    if extra_fields:
        extra = struct.pack(f"<HH{len(extra_fields)}Q", 1, 8 * len(extra_fields), *extra_fields)
    time, date = _dos_time(dt)  # type: ignore[arg-type]
    version = 45 if extra else 20
    entry = _CENTRAL.pack(_CENTRAL_SIG, version, version, 0, 0, time, date, crc, size32,
                          size32, len(name), len(extra), 0, 0, 0, 0, offset32)
    return entry + name + extra


def write_zip(
    src_fd: int,
    out_fd: int,
    records: Sequence[Record],
    replacements: dict[str, NewRecord | Callable[[], NewRecord]],
    *,
    align: int = 64,
    progress: Progress | None = None,
) -> None:
    """Write ``records`` in order to ``out_fd``, copying each from ``src_fd`` unless
    ``replacements`` has new content for it (given directly or produced on demand, so that
    at most one replaced record is in memory at a time)."""
    cursor = 0  # where the next byte goes, counting source bytes still to be copied
    central: list[bytes] = []
    pending: list[int] = []  # [source offset, length]: source bytes that go out as they are

    def flush() -> None:
        if pending:
            copy_range(src_fd, out_fd, pending[0], pending[1], progress)
            pending.clear()

    def emit(data: bytes | bytearray | memoryview) -> None:
        nonlocal cursor
        flush()
        cursor += write_all(out_fd, data)

    for rec in records:
        name = rec.name.encode("utf-8")
        repl = replacements.get(rec.name)
        new = repl() if callable(repl) else repl
        if new is not None:
            size = len(new.data)
            crc = new.crc if new.crc is not None else zlib.crc32(new.data)
        else:
            size, crc = rec.size, rec.crc
        header_offset = cursor
        header = _local_header(name, size, crc, cursor, rec.date_time, align)
        central.append(_central_entry(name, size, crc, header_offset, rec.date_time))
        start = rec.offset - len(header)
        if new is None and start >= 0 and os.pread(src_fd, len(header), start) == header:
            # The source holds these very bytes (same header, same padding: everything
            # after a resized record moved by a multiple of the alignment): copy header
            # and data with the neighbouring records in one in-kernel copy.
            if pending and pending[0] + pending[1] == start:
                pending[1] += len(header) + size
            else:
                flush()
                pending.extend((start, len(header) + size))
            cursor += len(header) + size
            continue
        emit(header)
        if new is not None:
            emit(new.data)
            if progress is not None:
                progress(size)
            del new
        else:
            flush()
            copy_range(src_fd, out_fd, rec.offset, rec.size, progress)
            cursor += rec.size
    flush()

    cd_offset = cursor
    for entry in central:
        emit(entry)
    cd_size = cursor - cd_offset
    count = len(central)
    if count >= 0xFFFF or cd_offset >= _U32 or cd_size >= _U32:
        eocd64_offset = cursor
        emit(_EOCD64.pack(0x06064B50, 44, 45, 45, 0, 0, count, count, cd_size, cd_offset))
        emit(_LOCATOR64.pack(0x07064B50, 0, eocd64_offset, 1))
        emit(_EOCD.pack(0x06054B50, 0, 0, 0xFFFF, 0xFFFF, _U32, _U32, 0))
    else:
        emit(_EOCD.pack(0x06054B50, 0, 0, count, count, cd_size, cd_offset, 0))
