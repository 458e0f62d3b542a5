"""Safe file output: atomic replace, streamed copies, and a writer lock.

Every rewrite goes through :func:`atomic_write`: a temporary file in the destination
folder, fsync, then ``os.replace`` over the target. A crash, a kill -9 or a full disk at
any point leaves the original byte-for-byte intact, and no temporary file survives an
error that Python sees. Temporary files are named ``.<target>.paramctl-<random>.tmp``
so that a later run can recognise and remove those left by a killed process.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import itertools
import os
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from paramctl.errors import CorruptFileError, WriteError

if TYPE_CHECKING:  # imported where used: `list` needs none of them (start-up time)
    import mmap
    import threading

__all__ = [
    "TEMP_MARK",
    "FdPool",
    "Prefill",
    "atomic_write",
    "check_rewritable",
    "copy_range",
    "copy_range_at",
    "discard_prefill",
    "file_identity",
    "in_hf_cache",
    "lock_wait",
    "locked",
    "pwrite_all",
    "read_ahead",
    "read_exact",
    "resolve_target",
    "start_prefill",
    "start_worker",
    "take_prefill",
    "write_all",
    "write_pieces",
]

TEMP_MARK = ".paramctl-"
_CHUNK = 8 << 20

Progress = Callable[[int], None]


FileIdentity = tuple[int, int, int, int]


def file_identity(st: os.stat_result) -> FileIdentity:
    """What must not change between reading a file and replacing it under the lock."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> int:
    """``os.write`` until every byte is out (it may write less); returns the length."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return len(data)


def resolve_target(path: Path) -> Path:
    """Follow symlinks so that the link's target, not the link, is replaced."""
    return Path(os.path.realpath(path))


def _temp_prefix(target: Path) -> str:
    return f".{target.name}{TEMP_MARK}"


def _remove_stale_temps(target: Path, keep: Path | None = None) -> None:
    prefix = _temp_prefix(target)
    with contextlib.suppress(OSError):
        for entry in os.scandir(target.parent):
            if keep is not None and entry.name == keep.name:
                continue
            if entry.name.startswith(prefix) and entry.name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def _explain(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on device"
    if exc.errno == errno.EFBIG:
        return "file too large for this filesystem or process limit"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return exc.strerror or str(exc)


# How long :func:`locked` waits for another writer's lock. A context variable rather than
# a parameter so that every writer module (each takes its own locks) honours ``--wait``
# without each one's signature growing: :func:`paramctl.writers.write` sets it.
_LOCK_WAIT: contextvars.ContextVar[float] = contextvars.ContextVar("lock_wait", default=0.0)
_POLL = 0.05


@contextlib.contextmanager
def lock_wait(seconds: float) -> Iterator[None]:
    """Within this block, :func:`locked` waits up to ``seconds`` for a lock held elsewhere."""
    token = _LOCK_WAIT.set(max(0.0, seconds))
    try:
        yield
    finally:
        _LOCK_WAIT.reset(token)


def _lock_holder(fd: int) -> tuple[int, list[str]] | None:
    """``(pid, argv)`` of the process holding a flock on ``fd``'s file, from
    ``/proc/locks`` (Linux); ``None`` when it cannot be told."""
    st = os.fstat(fd)
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2147466 0 EOF" (" -> " marks waiters)
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == ident:
            try:
                pid = int(fields[4])
            except ValueError:
                return None
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    argv = fh.read().decode("utf-8", "replace").split("\0")
            except OSError:
                argv = []
            return pid, [a for a in argv if a]
    return None


def _is_paramctl(argv: list[str]) -> bool:
    """``paramctl ...``, ``python -m paramctl ...`` or ``torchrun -m paramctl ...``."""
    if any(os.path.basename(a) == "paramctl" for a in argv[:2]):
        return True
    return any(a == "-m" and b == "paramctl" for a, b in itertools.pairwise(argv))


def _locked_message(path: Path, fd: int, waited: float) -> str:
    holder = _lock_holder(fd)
    after = f" (waited {waited:g} s)" if waited else ""
    advice = ("try again when it has finished" if waited else
              "try again when it has finished, or pass --wait SECONDS")
    if holder is None:
        return (f"{path} is locked by another process{after}, probably another paramctl "
                f"rewriting it; {advice}")
    pid, argv = holder
    if _is_paramctl(argv):
        return (f"{path} is being rewritten by another paramctl process (pid {pid}){after}; "
                f"{advice}")
    cmd = " ".join(argv)
    shown = cmd if len(cmd) <= 60 else cmd[:57] + "..."
    return (f"{path} is locked by another process (pid {pid}: {shown or 'unknown command'})"
            f"{after}; paramctl takes the same lock to rewrite it: {advice}")


def _acquire(path: Path, fd: int) -> None:
    """Take the exclusive flock, polling until the :func:`lock_wait` deadline."""
    wait = _LOCK_WAIT.get()
    start = time.monotonic()
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            waited = time.monotonic() - start
            if waited >= wait:
                raise WriteError(_locked_message(path, fd, wait)) from None
            time.sleep(min(_POLL, wait - waited))


@contextlib.contextmanager
def locked(path: Path, expect: FileIdentity | None = None) -> Iterator[int | None]:
    """Hold an exclusive writer lock on ``path`` (if it exists) for the whole rewrite, and
    yield the locked read-only fd (``None`` when the file does not exist yet).

    A second paramctl writing the same file is refused (at once, or after the
    :func:`lock_wait` allowance) instead of racing, with a message naming the holder's
    pid when ``/proc/locks`` tells it; the lock is taken on the file itself and re-checked
    after the fact, so a writer that opened the file just before another replaced it
    notices and stops. With ``expect`` (the :func:`file_identity` taken when the source
    was read), a file that changed in between is refused too, so no write starts from a
    stale read.
    """
    if not path.exists():
        yield None
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise WriteError(f"cannot open {path}: {_explain(exc)}") from None
    try:
        _acquire(path, fd)
        st = os.fstat(fd)
        if os.stat(path).st_ino != st.st_ino:
            raise WriteError(
                f"{path} was replaced by another process while opening it; run the command "
                "again"
            )
        if expect is not None and file_identity(st) != expect:
            raise WriteError(f"{path} changed while paramctl was reading it; run the command "
                             "again")
        yield fd
    finally:
        os.close(fd)


def in_hf_cache(path: Path) -> bool:
    """Whether ``path`` is a file of a Hugging Face hub cache: a ``snapshots/<rev>/`` entry
    that resolves into the content-addressed ``blobs/`` folder beside it."""
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and (real.parent.parent / "snapshots").is_dir():
        return True
    return "snapshots" in Path(os.path.abspath(path)).parts and "blobs" in real.parts


def _read_only(path: Path) -> bool:
    """No write permission for this user. root may write anything, so for root a file
    counts read-only when no write bit is set at all (``chmod a-w``)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    if os.geteuid() == 0:
        return not st.st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    return not os.access(path, os.W_OK)


def check_rewritable(path: Path, *, in_place: bool, force: bool = False) -> None:
    """Refuse to replace ``path`` when that would surprise: a file in the Hugging Face
    cache (rewriting its blob corrupts the cache: the blob is named by its content, and
    other snapshots may share it), or, in place and without ``force``, a read-only file
    (the atomic rename would replace it although its mode says "do not write").

    Called for every target on the write path (:func:`paramctl.writers.write`).
    """
    if not path.exists():
        return
    if in_hf_cache(path):
        how = "pass -o OUT" if in_place else "choose another -o"
        raise WriteError(f"{path} is a file in the Hugging Face cache; writing it in place "
                         f"would corrupt the cache: {how}")
    if in_place and not force and _read_only(resolve_target(path)):
        raise WriteError(f"{path} is read-only; write elsewhere with -o OUT, or pass --force")


def _block_sigint() -> bool:
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return False
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    return True


def _unblock(blocked: bool) -> None:
    if blocked:
        import signal

        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@contextlib.contextmanager
def atomic_write(target: Path, *, mode_from: Path | None = None,
                 prefill: Prefill | None = None) -> Iterator[BinaryIO]:
    """Yield an unbuffered binary file that replaces ``target`` when the block succeeds.

    The file mode comes from ``mode_from`` (default: the existing target), else the
    usual ``0o666 & ~umask``. On any exception the temporary file is removed and the
    target is untouched; :class:`OSError` becomes a one-line :class:`WriteError`.
    With ``prefill`` (from :func:`take_prefill`), the file yielded is its finished copy,
    positioned at its end, for the caller to overwrite what differs.
    """
    target = resolve_target(target)
    folder = target.parent
    if prefill is None:
        discard_prefill(target)  # its temporary file is about to count as stale
    _remove_stale_temps(target, keep=prefill.tmp if prefill is not None else None)
    # Ctrl-C between creating the temporary file and guarding it would leave it behind:
    # hold SIGINT until the clean-up below is in place.
    blocked = _block_sigint()
    try:
        import tempfile  # only writes need it (and its imports cost `list` start-up)

        if prefill is not None:
            fd, tmp_name = prefill.fd, str(prefill.tmp)
        else:
            fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=".tmp",
                                            dir=folder)
    except OSError as exc:
        _unblock(blocked)
        raise WriteError(f"cannot write to {folder}: {_explain(exc)}") from None
    tmp = Path(tmp_name)
    _BEHIND.pop(fd, None)
    try:
        _unblock(blocked)
        with os.fdopen(fd, "wb", buffering=0) as out:
            yield out
            os.fsync(out.fileno())
            _BEHIND.pop(fd, None)
        source_mode = mode_from if mode_from is not None else target
        try:
            mode = stat.S_IMODE(os.stat(source_mode).st_mode)
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, target)
        with contextlib.suppress(OSError):
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except OSError as exc:
        _BEHIND.pop(fd, None)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise WriteError(
            f"cannot write {target}: {_explain(exc)}; the original is unchanged"
        ) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


_WINDOW = 128 << 20
_SYNC_FILE_RANGE: Any = None  # the libc function, False when unavailable, None untried
# Per output fd: how far write-back has been started, and how far waited for.
_BEHIND: dict[int, list[int]] = {}


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    global _SYNC_FILE_RANGE, _FSTATFS
    if _SYNC_FILE_RANGE is None:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.sync_file_range
            fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            _SYNC_FILE_RANGE = fn
            statfs = libc.fstatfs
            statfs.argtypes = [ctypes.c_int, ctypes.c_char_p]
            _FSTATFS = statfs, ctypes.create_string_buffer, ctypes.c_long.from_buffer
        except (OSError, AttributeError):
            _SYNC_FILE_RANGE = False
    return cast("Callable[[int, int, int, int], int] | None", _SYNC_FILE_RANGE or None)


_FSTATFS: Any = None  # libc's fstatfs and the ctypes calls it needs, set with the above
_EXT4_MAGIC = 0xEF53  # f_type of ext2, ext3 and ext4


def _on_ext4(fd: int) -> bool:
    """``fd``'s file is on ext2/3/4, whose ``copy_file_range`` never shares blocks (no
    reflinks): it copies through the page cache, which :func:`_copy_direct` beats."""
    if not _sync_file_range() or _FSTATFS is None:
        return False
    statfs, new_buffer, long_at = _FSTATFS
    buffer = new_buffer(256)  # a struct statfs is 120 bytes on 64-bit Linux, f_type first
    return bool(statfs(fd, buffer) == 0 and long_at(buffer).value == _EXT4_MAGIC)


def _write_behind(dst: int, end: int) -> None:
    """Start writing everything up to ``end`` to disk, and wait for what lies more than one
    window behind it.

    The final fsync then has little left to do: disk writes overlap the copy instead of
    following it, and dirty pages stay bounded. Durability still comes from the fsync.
    """
    sfr = _sync_file_range()
    if sfr is None:
        return
    state = _BEHIND.setdefault(dst, [0, 0])
    started, waited = state
    if end > started:
        sfr(dst, started, end - started, 2)  # SYNC_FILE_RANGE_WRITE
        state[0] = end
    if end - _WINDOW > waited:
        sfr(dst, waited, end - _WINDOW - waited, 1 | 2 | 4)  # WAIT_BEFORE|WRITE|WAIT_AFTER
        state[1] = end - _WINDOW


def start_worker(target: Callable[[], None], name: str) -> threading.Thread:
    """Start a daemon thread that reads, copies or writes, with what those need (ctypes,
    mmap, queue) loaded first, here: an import in a thread can deadlock on the import lock
    when Ctrl-C interrupts the main thread inside an import of its own. Every paramctl
    worker thread starts here, and imports nothing once started."""
    import mmap  # noqa: F401
    import queue  # noqa: F401
    import threading

    _sync_file_range()
    thread = threading.Thread(target=target, name=f"paramctl-{name}", daemon=True)
    thread.start()
    return thread


def write_behind(dst: int) -> None:
    """Start writing what is in ``dst`` so far to disk (see :func:`_write_behind`): for
    writers that write bytes they made (a cast), so the final fsync has little left."""
    with contextlib.suppress(OSError):
        _write_behind(dst, os.lseek(dst, 0, os.SEEK_CUR))


def copy_range(src: int, dst: int, offset: int, length: int,
               progress: Progress | None = None) -> None:
    """Copy ``length`` bytes at ``offset`` of fd ``src`` to the current position of ``dst``
    (which moves past them): :func:`copy_range_at` there."""
    start = os.lseek(dst, 0, os.SEEK_CUR)
    copy_range_at(src, dst, offset, length, start, progress)
    os.lseek(dst, start + length, os.SEEK_SET)


def copy_range_at(src: int, dst: int, offset: int, length: int, dst_offset: int,
                  progress: Progress | None = None,
                  stop: Callable[[], bool] | None = None) -> None:
    """Copy ``length`` bytes at ``offset`` of fd ``src`` to ``dst_offset`` of fd ``dst``,
    leaving both file positions alone (so that another thread may write elsewhere in
    ``dst``). Uses ``copy_file_range`` (in-kernel, reflinks where the filesystem can,
    the GIL released), else plain reads, so tensor bytes never pass through Python
    objects on the fast path; on ext4, which cannot reflink, large copies write their
    whole blocks with ``O_DIRECT`` instead (:func:`_copy_direct`).
    ``stop`` is asked between windows whether to give up (the caller's error). Starts the
    disk write-back of what it copied, so only one thread may call it for a given ``dst``.
    """
    if length >= _DIRECT_MIN and hasattr(os, "O_DIRECT") and _on_ext4(dst):
        head = min(length, -dst_offset % _ALIGN)  # up to the first aligned output offset
        _copy_kernel(src, dst, offset, head, dst_offset, progress, stop)
        body = (length - head) - (length - head) % _ALIGN
        done = head + _copy_direct(src, dst, offset + head, body, dst_offset + head, progress,
                                   stop)
        # The unaligned tail, and whatever the direct copy left (refused, a short write, or
        # a stop, which the kernel copy sees too).
        _copy_kernel(src, dst, offset + done, length - done, dst_offset + done, progress, stop)
        return
    _copy_kernel(src, dst, offset, length, dst_offset, progress, stop)


def _copy_kernel(src: int, dst: int, offset: int, length: int, dst_offset: int,
                 progress: Progress | None, stop: Callable[[], bool] | None) -> None:
    """:func:`copy_range_at` in the kernel (``copy_file_range``), else by plain reads."""
    done = 0
    use_cfr = hasattr(os, "copy_file_range")
    while done < length:
        if stop is not None and stop():
            return
        step = min(length - done, _WINDOW)
        n = 0
        if use_cfr:
            try:
                n = os.copy_file_range(src, dst, step, offset + done, dst_offset + done)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP,
                                     errno.EPERM):
                    raise
                use_cfr = False
                continue
        else:
            n = pwrite_all(dst, os.pread(src, min(step, _CHUNK), offset + done),
                           dst_offset + done)
        if n == 0:
            raise OSError(errno.EIO, f"unexpected end of input at byte {offset + done}")
        done += n
        with contextlib.suppress(OSError):  # one writer thread per fd: see _write_behind
            _write_behind(dst, dst_offset + done)
        if progress is not None:
            progress(n)


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
    """``os.pwrite`` until every byte is out; returns the length."""
    view = memoryview(data)
    pos = offset
    while view:
        n = os.pwrite(fd, view, pos)
        view = view[n:]
        pos += n
    return len(data)


_QUICK_SWITCH = 1e-4  # seconds: how long a thread that wants the GIL waits at most
_SWITCH: dict[str, Any] = {"users": 0, "saved": None}  # guarded by its "lock", made on first use


@contextlib.contextmanager
def _quick_handoffs() -> Iterator[None]:
    """While this runs, a thread that wants the GIL gets it within 0.1 ms, not 5 ms.

    A direct copy's reader and writer each need the GIL for a moment between system
    calls; with another thread busy in Python (an init's head-start copy runs while torch
    is imported) each such moment waited for the interpreter's 5 ms switch interval. With
    a thread spinning in Python beside it, a 2.5 GiB direct copy took 11.2-11.3 s instead
    of 0.92-1.31 s; with this, 1.50-1.64 s. The interval is process-wide: it is set back
    once the last copy using it ends. Forced switches only happen when a thread is waiting
    for the GIL.
    """
    import threading

    lock = _SWITCH.setdefault("lock", threading.Lock())  # setdefault: atomic
    with lock:
        if _SWITCH["users"] == 0:
            _SWITCH["saved"] = sys.getswitchinterval()
            sys.setswitchinterval(min(_SWITCH["saved"], _QUICK_SWITCH))
        _SWITCH["users"] += 1
    try:
        yield
    finally:
        with lock:
            _SWITCH["users"] -= 1
            if _SWITCH["users"] == 0:
                sys.setswitchinterval(_SWITCH["saved"])


# Copies this long or longer go through _copy_direct where it applies: below, a thread and
# three buffers cost more than they save.
_DIRECT_MIN = 4 << 20
_DIRECT_PIECE = 2 << 20  # measured best of 2, 4 and 8 MiB for a 2.5 GiB copy
# Page-aligned buffers (anonymous mmaps) that finished direct copies and sinks left, by
# size, for the next ones (fresh pages cost a fault per 4 KiB). Taken and given back one
# atomic list operation at a time, so two users at once never share one.
_ALIGNED: dict[int, list[mmap.mmap]] = {}


def _aligned_buffers(size: int, count: int) -> list[mmap.mmap]:
    import mmap  # loaded already when this runs in a worker (see start_worker)

    pool = _ALIGNED.setdefault(size, [])
    out: list[mmap.mmap] = []
    for _ in range(count):
        try:
            out.append(pool.pop())
        except IndexError:
            out.append(mmap.mmap(-1, size))
    return out


def _keep_aligned(buffers: Iterable[mmap.mmap]) -> None:
    for buffer in buffers:
        _ALIGNED.setdefault(len(buffer), []).append(buffer)


def _copy_direct(src: int, dst: int, offset: int, length: int, dst_offset: int,
                 progress: Progress | None, stop: Callable[[], bool] | None) -> int:
    """Copy ``[offset, offset + length)`` of ``src`` to ``dst_offset`` of ``dst`` (both
    ``dst_offset`` and ``length`` multiples of ``_ALIGN``) by reading into page-aligned
    buffers here and writing them with ``O_DIRECT`` from a second thread; returns how
    many bytes from the start it copied. Less than ``length`` when ``dst`` refuses direct
    writes, a write comes back short, or the source ends early: the caller copies the
    rest the usual way, which also reports a short source.

    Why: ext4's ``copy_file_range`` copies into fresh page-cache pages and writes them
    back; for the 2.5 GiB reference file that costs 0.8 s of system time and 1.23-1.40 s
    with the fsync (as does ``cp && sync``). Direct writes skip the page cache: 0.3 s of
    system time and 0.85-1.0 s. The writes go through a second open file description
    (``/proc/self/fd``), so ``dst``'s own flags never change under another thread's
    buffered writes elsewhere in the file. Durability still comes from the fsync of
    :func:`atomic_write`: it commits the blocks the direct writes allocated.
    """
    if length <= 0:
        return 0
    try:
        twin = os.open(f"/proc/self/fd/{dst}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:  # no /proc, or no O_DIRECT here
        return 0
    import queue  # loaded already when this runs in a worker (see start_worker)

    buffers = _aligned_buffers(_DIRECT_PIECE, 3)
    free: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()  # (buffer, bytes written)
    todo: queue.SimpleQueue[tuple[int, int, int] | None] = queue.SimpleQueue()
    for i in range(len(buffers)):
        free.put((i, 0))
    # Why the writer stopped writing: an error, a short write's length, or None when this
    # side gave up. Every job still comes back through `free`, written or not.
    stopped: list[BaseException | int | None] = []

    def writer() -> None:
        while (job := todo.get()) is not None:
            i, at, n = job
            written = 0
            if not stopped:
                try:
                    written = os.pwritev(twin, [memoryview(buffers[i])[:n]], at)
                    if written < n:
                        stopped.append(written)
                except BaseException as exc:
                    stopped.append(exc)
            free.put((i, written))

    copied = read = jobs = taken = 0

    def settle(written: int) -> None:
        nonlocal copied
        copied += written
        if progress is not None and written:
            progress(written)

    with _quick_handoffs():
        thread = start_worker(writer, "direct-copy")
        try:
            while read < length and not stopped and not (stop is not None and stop()):
                i, written = free.get()
                taken += 1
                settle(written)
                want = min(_DIRECT_PIECE, length - read)
                got = _fill(src, memoryview(buffers[i])[:want], offset + read)
                whole = got - got % _ALIGN
                if whole:
                    todo.put((i, dst_offset + read, whole))
                    jobs += 1
                    read += whole
                if got < want:  # the source ended early: the caller's own copy says so
                    break
        except BaseException:
            stopped.append(None)
            raise
        finally:
            todo.put(None)
            late = sum(free.get()[1] for _ in range(jobs - taken + len(buffers)))
            thread.join()
            os.close(twin)
            _keep_aligned(buffers)
    settle(late)  # not in `finally`: a progress callback that raises must not skip it
    why = stopped[0] if stopped else None
    if isinstance(why, BaseException) and not (
            isinstance(why, OSError) and why.errno in (errno.EINVAL, errno.EOPNOTSUPP)):
        raise why  # a full disk, a file size limit, an I/O error: as the kernel copy would
    return copied


class Prefill:
    """A copy of ``source`` into a temporary file beside ``target``, made by a background
    thread from the start of a command that will probably rewrite ``source`` into
    ``target`` with most bytes unchanged (``init``): the copy then runs while the command
    imports torch (about a second: the import holds the GIL, but an in-kernel copy does
    not need it). A writer that finds its output would start as this very copy takes it
    (:func:`take_prefill`) and overwrites what differs; any other outcome discards it.
    The temporary file is named as :func:`atomic_write`'s, so one left by a killed
    process is removed like theirs.
    """

    def __init__(self, source: Path, target: Path) -> None:
        import tempfile
        import threading

        self.target = resolve_target(target)
        self.src_fd = os.open(source, os.O_RDONLY)
        try:
            st = os.fstat(self.src_fd)
            self.identity = file_identity(st)
            self.fd, name = tempfile.mkstemp(prefix=_temp_prefix(self.target), suffix=".tmp",
                                             dir=self.target.parent)
        except BaseException:
            os.close(self.src_fd)
            raise
        self.tmp = Path(name)
        self.size = st.st_size
        self.failed: BaseException | None = None
        self.copied = 0  # bytes at the start of the file copied so far
        self._moved = threading.Condition()
        self._stop = threading.Event()
        self._thread = start_worker(self._copy, "prefill")

    def _copy(self) -> None:
        def moved(n: int) -> None:
            with self._moved:
                self.copied += n
                self._moved.notify_all()

        try:
            copy_range_at(self.src_fd, self.fd, 0, self.size, 0, moved, self._stop.is_set)
        except BaseException as exc:
            self.failed = exc
        finally:
            with self._moved:
                self._stop.set()  # done, one way or the other
                self._moved.notify_all()

    def same_source(self, source_fd: int) -> bool:
        """``source_fd`` is the file this copies, unchanged since the copy began."""
        return file_identity(os.fstat(source_fd)) == self.identity

    def wait_past(self, end: int) -> None:
        """Return once the first ``end`` bytes are copied (or the copy stopped), so that
        writing below ``end`` cannot be overwritten by the copy."""
        with self._moved:
            while self.copied < end and not self._stop.is_set():
                self._moved.wait()

    def finish(self, source_fd: int) -> bool:
        """Wait for the copy; ``True`` when it is whole and ``source_fd`` is the same,
        unchanged file it was copied from."""
        self._thread.join()
        if self.failed is not None or self.copied != self.size:
            return False
        same = self.same_source(source_fd) and file_identity(
            os.fstat(self.src_fd)) == self.identity
        self.close_source()
        return same

    def halt(self) -> None:
        """Stop the copy and wait for it: nothing writes to ``fd`` after this returns."""
        self._stop.set()
        self._thread.join()

    def close_source(self) -> None:
        if self.src_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.src_fd)
            self.src_fd = -1

    def discard(self) -> None:
        self.halt()
        for fd in (self.fd, self.src_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fd = self.src_fd = -1
        with contextlib.suppress(OSError):
            self.tmp.unlink()


_PREFILLS: dict[Path, Prefill] = {}


def start_prefill(source: Path, target: Path) -> None:
    """Start copying ``source`` towards ``target`` in the background (see :class:`Prefill`);
    a failure to start is no error (the writer then copies as usual)."""
    try:
        prefill = Prefill(source, target)
    except OSError:
        return
    if not _PREFILLS:
        import atexit

        atexit.register(discard_all_prefills)
    _PREFILLS[prefill.target] = prefill


def take_prefill(target: Path, source_fd: int) -> Prefill | None:
    """The copy for ``target`` of the file open as ``source_fd`` (perhaps still running:
    see :meth:`Prefill.wait_past` and :meth:`Prefill.finish`), or ``None``. The caller
    owns it from then on: :func:`atomic_write` closes or removes its file."""
    prefill = _PREFILLS.pop(resolve_target(target), None)
    if prefill is None:
        return None
    if prefill.failed is None and prefill.same_source(source_fd):
        return prefill
    prefill.discard()
    return None


def discard_prefill(target: Path) -> None:
    prefill = _PREFILLS.pop(resolve_target(target), None)
    if prefill is not None:
        prefill.discard()


def discard_all_prefills() -> None:
    while _PREFILLS:
        _PREFILLS.popitem()[1].discard()


class FdPool:
    """Read-only fds, opened on demand and closed together (a rewrite's inputs).

    ``adopt`` registers an fd the caller already holds (e.g. the locked source file),
    which the pool uses but does not close.
    """

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._owned: list[int] = []

    def adopt(self, path: Path, fd: int) -> None:
        self._fds[os.path.realpath(path)] = fd

    def get(self, path: Path) -> int:
        key = os.path.realpath(path)
        fd = self._fds.get(key)
        if fd is None:
            try:
                fd = os.open(key, os.O_RDONLY)
            except OSError as exc:
                raise WriteError(f"cannot open {path}: {_explain(exc)}") from None
            self._fds[key] = fd
            self._owned.append(fd)
        return fd

    def close(self) -> None:
        for fd in self._owned:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._owned.clear()
        self._fds.clear()

    def __enter__(self) -> FdPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_exact(fd: int, n: int, offset: int, what: str) -> bytearray:
    """``n`` bytes at ``offset``, or a one-line error naming ``what`` when the file is short."""
    buf = bytearray(n)
    if _fill(fd, memoryview(buf), offset) < n:
        raise CorruptFileError(f"truncated data for {what}")
    return buf


def _fill(fd: int, view: memoryview, offset: int) -> int:
    """Read into ``view`` from ``offset`` of ``fd`` until it is full or the file ends;
    returns how many bytes it read."""
    got = 0
    while got < len(view) and (k := os.preadv(fd, [view[got:]], offset + got)):
        got += k
    return got


_STOP = object()


def read_ahead(fd: int, offset: int, length: int, what: str, *, step: int = 4 << 20,
               depth: int = 2) -> Iterator[memoryview]:
    """The bytes at ``[offset, offset + length)`` of ``fd`` in pieces of ``step`` bytes.

    A background thread reads up to ``depth`` pieces ahead of the consumer into buffers
    it reuses (``pread`` drops the GIL, so reading overlaps the consumer's work, and
    reused buffers cost no page faults). Each piece stays valid only until the next one
    is requested. A short file is a one-line error naming ``what``.
    """
    if length <= step:  # one piece: no thread
        yield memoryview(read_exact(fd, length, offset, what))
        return
    import queue
    import threading

    buffers = _spare_buffers(step, depth + 1)
    free: queue.Queue[int] = queue.Queue()
    ready: queue.Queue[tuple[int, int] | BaseException | object] = queue.Queue()
    for i in range(len(buffers)):
        free.put(i)
    stop = threading.Event()

    def reader() -> None:
        pos, end = offset, offset + length
        try:
            while pos < end and not stop.is_set():
                slot = free.get()
                if stop.is_set():
                    break
                n = min(step, end - pos)
                if _fill(fd, memoryview(buffers[slot])[:n], pos) < n:
                    raise CorruptFileError(f"truncated data for {what}")
                ready.put((slot, n))
                pos += n
        except BaseException as exc:  # handed to the consumer, which raises it
            ready.put(exc)
            return
        ready.put(_STOP)

    thread = start_worker(reader, "read-ahead")
    held = -1
    try:
        while True:
            if held >= 0:
                free.put(held)
                held = -1
            item = ready.get()
            if item is _STOP:
                return
            if isinstance(item, BaseException):
                raise item
            held, n = cast("tuple[int, int]", item)
            yield memoryview(buffers[held])[:n]
    finally:
        stop.set()
        free.put(-1)  # wake the reader if it waits for a buffer
        thread.join()
        _SPARE.extend(buffers)


# Buffers a finished read_ahead left, for the next one (fresh pages cost a fault per 4 KiB:
# about 0.4 s of a 2.5 GiB cast when every tensor allocated its own).
_SPARE: list[bytearray] = []


def _spare_buffers(size: int, count: int) -> list[bytearray]:
    out: list[bytearray] = []
    while _SPARE and len(out) < count:
        buf = _SPARE.pop()
        if len(buf) == size:
            out.append(buf)
    return out + [bytearray(size) for _ in range(count - len(out))]


def write_pieces(fd: int, pieces: Iterable[bytes | bytearray | memoryview], *,
                 hold: int) -> int:
    """Write ``pieces`` in order at the current position of ``fd``; returns the length.

    A background thread writes (``write`` drops the GIL) while the next pieces are made,
    whole aligned blocks with ``O_DIRECT`` where the filesystem takes it (see
    :class:`_Sink`). ``hold``: how many more pieces the iterator may be asked for while an
    earlier piece is still being written (its pieces may be reused buffers). An error on
    either side stops both and is raised.
    """
    import queue
    import threading

    slots = threading.Semaphore(hold + 1)
    todo: queue.Queue[bytes | bytearray | memoryview | object] = queue.Queue()
    failed: list[BaseException] = []
    written = [0]

    sink = _Sink(fd)

    def writer() -> None:
        try:
            while (piece := todo.get()) is not _STOP:
                try:
                    if not failed:
                        written[0] += sink.write(cast("bytes", piece))
                except BaseException as exc:  # raised by the producer below
                    failed.append(exc)
                finally:
                    slots.release()
            if not failed:
                sink.finish()
        except BaseException as exc:
            failed.append(exc)
        finally:
            sink.close()

    thread = start_worker(writer, "write")
    try:
        for piece in _throttled(pieces, slots, failed):
            todo.put(piece)
    finally:
        todo.put(_STOP)
        thread.join()
    if failed:
        raise failed[0]
    return written[0]


def _throttled(pieces: Iterable[bytes | bytearray | memoryview], slots: threading.Semaphore,
               failed: list[BaseException]) -> Iterator[bytes | bytearray | memoryview]:
    """``pieces``, each requested only once a write slot is free (and none has failed)."""
    it = iter(pieces)
    while True:
        slots.acquire()
        if failed:
            return
        try:
            piece = next(it)
        except StopIteration:
            return
        yield piece


_ALIGN = 4096  # O_DIRECT: offsets, lengths and memory aligned to this (the largest usual)
_STAGE = 8 << 20


class _Sink:
    """Writes a byte stream at the current position of ``fd``: whole aligned blocks with
    ``O_DIRECT``, the unaligned ends (and everything, where the filesystem refuses
    ``O_DIRECT``) through the page cache.

    Why: in the page cache, writing made bytes is a copy into fresh pages whose cost
    swings wildly on a VM (2.5 GiB: 0.6 to 4.3 s of system time, measured with dd),
    then write-back; direct writes go from one reused, page-aligned staging buffer to
    the disk (0.97 s, 0.14 s of CPU, every time). Durability still comes from the fsync
    of :func:`atomic_write`. ``O_DIRECT`` is set only while this sink writes.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pos = os.lseek(fd, 0, os.SEEK_CUR)
        self.flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        self.direct = hasattr(os, "O_DIRECT")
        self.stage: Any = None
        self.fill = 0

    def write(self, piece: bytes | bytearray | memoryview) -> int:
        data = memoryview(piece).cast("B")
        n = len(data)
        if self.direct and self.stage is None and self.pos % _ALIGN:
            head = min(n, -self.pos % _ALIGN)  # up to the first aligned offset
            self.pos += write_all(self.fd, data[:head])
            data = data[head:]
        while data and self.direct:
            if self.stage is None:
                (self.stage,) = _aligned_buffers(_STAGE, 1)
            take = min(len(data), _STAGE - self.fill)
            self.stage[self.fill:self.fill + take] = data[:take]
            self.fill += take
            data = data[take:]
            if self.fill == _STAGE:
                self._flush(_STAGE)
        if not self.direct:  # the page cache (from the start, or since a refusal)
            if self.fill:
                self._flush(self.fill)
            if data:
                self.pos += write_all(self.fd, data)
                write_behind(self.fd)
        return n

    def _flush(self, n: int) -> None:
        """Write the first ``n`` staged bytes (whole blocks, at an aligned offset)."""
        view = memoryview(self.stage)
        try:
            if self.direct:
                try:
                    fcntl.fcntl(self.fd, fcntl.F_SETFL, self.flags | os.O_DIRECT)
                    write_all(self.fd, view[:n])
                except OSError as exc:
                    if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    # Not on this filesystem (some FUSE, old tmpfs): the page cache from here.
                    self.direct = False
                    self._buffered()
                    write_all(self.fd, view[:n])
            else:
                write_all(self.fd, view[:n])
            self.pos += n
            view[:self.fill - n] = view[n:self.fill]
            self.fill -= n
        finally:
            view.release()

    def _buffered(self) -> None:
        fcntl.fcntl(self.fd, fcntl.F_SETFL, self.flags)
        os.lseek(self.fd, self.pos, os.SEEK_SET)  # a refused write may have moved nothing

    def finish(self) -> None:
        """Write what is staged: its whole blocks directly, the rest buffered."""
        if self.stage is None:
            return
        whole = self.fill - self.fill % _ALIGN
        if whole and self.direct:
            self._flush(whole)
        self._buffered()
        self.direct = False
        if self.fill:
            self._flush(self.fill)

    def close(self) -> None:
        """Leave the fd as it was found (no ``O_DIRECT``) and keep the staging buffer."""
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.fd, fcntl.F_SETFL, self.flags)
        if self.stage is not None:
            _keep_aligned([self.stage])
            self.stage = None

