"""The streaming pieces a cast runs on: read_ahead (a reader thread over reused buffers) and
write_pieces (a writer thread). Real files and fds, no mocks."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from paramctl.errors import CorruptFileError
from paramctl.io.files import read_ahead, write_pieces


def data(n: int) -> bytes:
    return bytes((i * 7 + i // 251) & 0xFF for i in range(n))


@pytest.mark.parametrize(("length", "step"), [(0, 16), (5, 16), (16, 16), (17, 16),
                                              (1000, 16), (1000, 7), (4096, 1024)])
def test_read_ahead_yields_the_range_in_pieces(tmp_path: Path, length: int, step: int) -> None:
    blob = data(length + 30)
    path = tmp_path / "f"
    path.write_bytes(blob)
    fd = os.open(path, os.O_RDONLY)
    try:
        pieces = [bytes(p) for p in read_ahead(fd, 30, length, "t", step=step)]
    finally:
        os.close(fd)
    assert b"".join(pieces) == blob[30:30 + length]
    assert all(len(p) == step for p in pieces[:-1])


def test_read_ahead_of_a_short_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(data(100))
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(CorruptFileError, match=r"^truncated data for 'w'$"):
            for _ in read_ahead(fd, 0, 400, "'w'", step=32):
                pass
    finally:
        os.close(fd)


def test_read_ahead_stops_its_thread_when_abandoned(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(data(1 << 16))
    fd = os.open(path, os.O_RDONLY)
    try:
        before = threading.active_count()
        stream = read_ahead(fd, 0, 1 << 16, "t", step=64)
        next(stream)
        assert threading.active_count() == before + 1
        stream.close()
        assert threading.active_count() == before
    finally:
        os.close(fd)


def reused(blob: bytes, step: int, ring: int) -> Iterator[memoryview]:
    """Pieces in RING reused buffers, as numeric.cast_chunks makes them."""
    buffers = [bytearray(step) for _ in range(ring)]
    for i, start in enumerate(range(0, len(blob), step)):
        piece = blob[start:start + step]
        buf = buffers[i % ring]
        buf[:len(piece)] = piece
        yield memoryview(buf)[:len(piece)]


@pytest.mark.parametrize("hold", [0, 1, 2])
def test_write_pieces_respects_hold(tmp_path: Path, hold: int) -> None:
    blob = data(200_000)
    out = tmp_path / "o"
    with out.open("wb") as fh:
        n = write_pieces(fh.fileno(), reused(blob, 1000, hold + 1), hold=hold)
    assert n == len(blob)
    assert out.read_bytes() == blob


def test_write_pieces_raises_the_producers_error(tmp_path: Path) -> None:
    def pieces() -> Iterator[bytes]:
        yield b"a" * 10
        raise ValueError("overflow in w")

    with (tmp_path / "o").open("wb") as fh, pytest.raises(ValueError, match="overflow in w"):
        write_pieces(fh.fileno(), pieces(), hold=2)
    assert threading.active_count() == 1 or all(
        t.name != "paramctl-write" for t in threading.enumerate())


def test_write_pieces_raises_the_writers_error_and_stops_asking(tmp_path: Path) -> None:
    asked = []

    def pieces() -> Iterator[bytes]:
        for i in range(1000):
            asked.append(i)
            yield b"x" * (1 << 20)  # staged writes go out every 8 MiB

    fd = os.open(tmp_path / "o", os.O_RDONLY | os.O_CREAT)  # writing to it fails: EBADF
    try:
        with pytest.raises(OSError):
            write_pieces(fd, pieces(), hold=2)
    finally:
        os.close(fd)
    assert len(asked) < 1000


@pytest.mark.parametrize("sizes", [[1], [5000], [4096 * 3], [3 << 20] * 7, [123_457] * 150,
                                   [1, 8 << 20, 17, 4096, (8 << 20) + 5]])
def test_write_pieces_between_buffered_writes(tmp_path: Path, sizes: list[int]) -> None:
    """An unaligned start (a header before), pieces of any size, then more buffered writes
    on the same fd: the bytes land in order, the fd's flags and position are as before."""
    import fcntl

    blob = data(sum(sizes))
    out = tmp_path / "o"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        os.write(fd, b"header-13-byt")
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        pieces = (blob[s:s + n] for s, n in zip(starts, sizes, strict=True))
        assert write_pieces(fd, pieces, hold=2) == len(blob)
        assert fcntl.fcntl(fd, fcntl.F_GETFL) == flags
        assert os.lseek(fd, 0, os.SEEK_CUR) == 13 + len(blob)
        os.write(fd, b"trailer")
    finally:
        os.close(fd)
    assert out.read_bytes() == b"header-13-byt" + blob + b"trailer"


def test_write_pieces_falls_back_when_direct_writes_are_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An alignment the kernel refuses for O_DIRECT (EINVAL), on this real filesystem: the
    # sink must notice and write through the page cache instead, losing nothing.
    from paramctl.io import files

    monkeypatch.setattr(files, "_ALIGN", 1000)
    monkeypatch.setattr(files, "_STAGE", 64_000)
    monkeypatch.setattr(files, "_ALIGNED", {})
    blob = data(1_000_003)
    out = tmp_path / "o"
    with out.open("wb") as fh:
        fh.write(b"abc")
        fh.flush()
        n = write_pieces(fh.fileno(), (blob[i:i + 9999] for i in range(0, len(blob), 9999)),
                         hold=1)
    assert n == len(blob)
    assert out.read_bytes() == b"abc" + blob
