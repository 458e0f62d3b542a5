"""copy_range_at's direct path: on ext4, large copies read into page-aligned buffers and
write whole blocks with O_DIRECT from a second thread (io.files._copy_direct), the
unaligned ends in the kernel. Real files, fds, threads and kernel errors; the sizes are
made small by lowering the thresholds, so that many pieces and both ends are exercised."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from paramctl.io import files
from paramctl.io.files import copy_range, copy_range_at

REPO = Path(__file__).resolve().parent.parent


def data(n: int) -> bytes:
    return bytes((i * 13 + i // 509) & 0xFF for i in range(n))


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Direct copies from 64 KiB up, in 16 KiB pieces; returns the (emptied) buffer pool,
    which a direct copy refills when it ran."""
    pool: list[object] = []
    monkeypatch.setattr(files, "_DIRECT_MIN", 64 << 10)
    monkeypatch.setattr(files, "_DIRECT_PIECE", 16 << 10)
    monkeypatch.setattr(files, "_ALIGNED", {16 << 10: pool})
    return pool


@pytest.fixture
def source(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    blob = data(1_000_003)
    path = tmp_path / "src"
    path.write_bytes(blob)
    with opened(path, os.O_RDONLY) as fd:
        yield fd, blob


@contextlib.contextmanager
def opened(path: Path, flags: int = os.O_RDWR | os.O_CREAT | os.O_TRUNC) -> Iterator[int]:
    """An fd of ``path`` (by default a new, empty output), closed afterwards."""
    fd = os.open(path, flags, 0o600)
    try:
        yield fd
    finally:
        os.close(fd)


def on_ext4(path: Path) -> bool:
    with opened(path, os.O_RDONLY) as fd:
        return files._on_ext4(fd)


@pytest.mark.parametrize(("offset", "length", "dst_offset"), [
    (0, 1_000_003, 0),  # the whole file: aligned start, unaligned end
    (0, 4096 * 100, 0),  # aligned both ends: no kernel copy at all
    (7, 999_000, 13),  # unaligned source and destination
    (5000, 70_000, 4095),  # one byte short of a block, then a short body
    (123, 65_536, 8192 + 1),
    (1, 4096 * 40 + 1, 4096 * 3),
])
def test_copy_is_exact_and_leaves_the_fd_as_it_was(
        tmp_path: Path, source: tuple[int, bytes], small_pieces: list[object], offset: int,
        length: int, dst_offset: int) -> None:
    src, blob = source
    out = tmp_path / "out"
    moved: list[int] = []
    with opened(out) as fd:
        os.write(fd, b"x" * 10)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        before = threading.active_count()
        copy_range_at(src, fd, offset, length, dst_offset, moved.append)
        assert threading.active_count() == before
        assert fcntl.fcntl(fd, fcntl.F_GETFL) == flags
        assert os.lseek(fd, 0, os.SEEK_CUR) == 10  # the position is left alone
        assert os.lseek(src, 0, os.SEEK_CUR) == 0
        os.fsync(fd)
    got = out.read_bytes()
    assert len(got) == dst_offset + length
    assert got[dst_offset:] == blob[offset:offset + length]
    assert sum(moved) == length and all(n > 0 for n in moved)
    if on_ext4(out):
        assert len(small_pieces) == 3  # the direct path ran, and gave its buffers back


def test_copy_range_moves_the_position_past_the_copy(
        tmp_path: Path, source: tuple[int, bytes], small_pieces: list[object]) -> None:
    src, blob = source
    out = tmp_path / "out"
    with out.open("wb") as fh:
        fh.write(b"head")
        fh.flush()
        copy_range(src, fh.fileno(), 3, 500_000)
        fh.write(b"tail")
    assert out.read_bytes() == b"head" + blob[3:500_003] + b"tail"


def test_buffered_writes_beside_a_direct_copy(
        tmp_path: Path, source: tuple[int, bytes], small_pieces: list[object]) -> None:
    """What an init does: one thread copies the untouched ranges while another writes the
    new tensors between them through the same fd, sharing pages at the borders."""
    src, blob = source
    cuts = [0, 100_001, 100_001 + 777, 600_000, 600_000 + 4096, 1_000_003]
    spans = list(itertools.pairwise(cuts))
    copied, written = spans[0::2], spans[1::2]
    out = tmp_path / "out"
    with opened(out) as fd:
        def copy_all() -> None:
            for begin, end in copied:
                copy_range_at(src, fd, begin, end - begin, begin)

        thread = threading.Thread(target=copy_all)
        thread.start()
        for begin, end in written:
            os.pwrite(fd, b"N" * (end - begin), begin)
        thread.join()
        os.fsync(fd)
    want = bytearray(blob)
    for begin, end in written:
        want[begin:end] = b"N" * (end - begin)
    assert out.read_bytes() == bytes(want)


def test_a_short_source_is_the_usual_error(
        tmp_path: Path, source: tuple[int, bytes], small_pieces: list[object]) -> None:
    src, blob = source
    out = tmp_path / "out"
    moved: list[int] = []
    with opened(out) as fd:
        with pytest.raises(OSError, match="unexpected end of input at byte 1000003") as info:
            copy_range_at(src, fd, 0, len(blob) + 300_000, 0, moved.append)
        assert info.value.errno == errno.EIO
    assert sum(moved) == len(blob)
    assert out.read_bytes() == blob


def test_refused_direct_writes_fall_back(
        tmp_path: Path, source: tuple[int, bytes], small_pieces: list[object],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # An alignment the kernel refuses for O_DIRECT (EINVAL), on this real filesystem: the
    # copy must notice and finish in the kernel, losing nothing.
    monkeypatch.setattr(files, "_ALIGN", 1000)
    src, blob = source
    out = tmp_path / "out"
    moved: list[int] = []
    with opened(out) as fd:
        copy_range_at(src, fd, 11, 900_000, 1, moved.append)
    assert out.read_bytes()[1:] == blob[11:900_011]
    assert sum(moved) == 900_000


def test_stop_ends_the_copy_early(
        tmp_path: Path, source: tuple[int, bytes], small_pieces: list[object]) -> None:
    src, blob = source
    out = tmp_path / "out"
    moved: list[int] = []
    before = threading.active_count()
    with opened(out) as fd:
        copy_range_at(src, fd, 0, len(blob), 0, moved.append, stop=lambda: len(moved) > 2)
    assert 0 < sum(moved) < len(blob)
    assert threading.active_count() == before
    got = out.read_bytes()
    assert got == blob[:len(got)]


CHILD = """
import os, resource, sys
from paramctl.io import files
files._DIRECT_MIN, files._DIRECT_PIECE = 64 << 10, 16 << 10
resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
src = os.open(sys.argv[1], os.O_RDONLY)
dst = os.open(sys.argv[2], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
try:
    files.copy_range_at(src, dst, 0, 1_000_003, 0)
except OSError as exc:
    print(exc.errno)
"""


def test_a_file_size_limit_is_raised_not_hidden(
        tmp_path: Path, source: tuple[int, bytes]) -> None:
    """A real EFBIG in the middle of the direct writes (a short write, then a refusal)."""
    (tmp_path / "src").write_bytes(data(1_000_003))
    import signal

    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "src"), str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO, timeout=60,
        preexec_fn=lambda: signal.signal(signal.SIGXFSZ, signal.SIG_IGN))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(errno.EFBIG)
    assert (tmp_path / "out").stat().st_size <= 300_000


def test_other_filesystems_keep_the_kernel_copy(
        source: tuple[int, bytes], small_pieces: list[object]) -> None:
    """tmpfs is not ext4: the copy stays copy_file_range (which reflinks where a filesystem
    can), and is as exact."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or on_ext4(shm):
        pytest.skip("no tmpfs at /dev/shm")
    src, blob = source
    out = shm / f"paramctl-test-{os.getpid()}"
    try:
        with opened(out) as fd:
            assert not files._on_ext4(fd)
            copy_range_at(src, fd, 5, 900_000, 3)
            assert os.pread(fd, 900_003, 0)[3:] == blob[5:900_005]
    finally:
        out.unlink()
    assert small_pieces == []  # no direct copy ran


def test_two_copies_at_once_are_exact(
        tmp_path: Path, source: tuple[int, bytes], small_pieces: list[object]) -> None:
    """Two direct copies in one process at once (no writer does this today: atomic_write
    stops a head-start copy it does not take), interleaved as finely as Python allows, are
    exact, and give back six distinct buffers."""
    src, blob = source
    errors: list[BaseException] = []

    def copies(k: int) -> None:
        try:
            for i in range(20):
                out = tmp_path / f"out-{k}-{i}"
                with opened(out) as fd:
                    copy_range_at(src, fd, k, len(blob) - k, 0)
                if out.read_bytes() != blob[k:]:
                    raise AssertionError(f"copy {k}/{i} differs")
                out.unlink()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=copies, args=(k,)) for k in (0, 1)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as can be: races show
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    if on_ext4(tmp_path):
        assert len(small_pieces) == 6 and len({id(b) for b in small_pieces}) == 6


def test_threads_get_the_gil_back_quickly_while_copying(
        tmp_path: Path, source: tuple[int, bytes], small_pieces: list[object]) -> None:
    """While a direct copy runs, the switch interval is 0.1 ms (its reader and writer need
    the GIL between system calls, and a thread busy in Python beside them held it 5 ms at
    a time); afterwards, and after an error (here the progress callback's), it is what it
    was, and nothing is left open or running."""
    if not on_ext4(tmp_path):
        pytest.skip("the direct path runs on ext4 only")
    src, blob = source
    before = sys.getswitchinterval()
    seen: list[float] = []
    out = tmp_path / "out"
    with opened(out) as fd:
        copy_range_at(src, fd, 0, len(blob), 0, lambda n: seen.append(sys.getswitchinterval()))
        assert sys.getswitchinterval() == before

        def fail(n: int) -> None:
            raise RuntimeError("the caller's error")

        fds, threads = sorted(os.listdir("/proc/self/fd")), threading.active_count()
        with pytest.raises(RuntimeError, match="the caller's error"):
            copy_range_at(src, fd, 0, len(blob), 0, fail)
        assert sys.getswitchinterval() == before
        assert sorted(os.listdir("/proc/self/fd")) == fds  # the second description closed
        assert threading.active_count() == threads
    assert any(v == pytest.approx(files._QUICK_SWITCH) for v in seen)
