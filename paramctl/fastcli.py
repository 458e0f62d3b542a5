"""The command line's Typer-free half: ``list`` without Typer, and what both halves share.

``paramctl list FILE -f tsv`` spends most of its time starting up: building the Typer app
imports typer, click and what they import (about 100 ms here), more than reading a
100,000-tensor header takes. So :func:`fast_main` (called first by the entry point,
:mod:`paramctl.__main__`) reads the usual ``list`` command lines itself
and runs them with no Typer at all. Anything it does not fully recognise (help, an option
it does not know or a new one, a malformed value, ``--``, ``--debug``) goes to the Typer app
in :mod:`paramctl.cli`, which gives the usual messages. Both paths run :func:`run_list`, so
what a command line does and prints cannot depend on which path took it.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from paramctl.errors import ParamctlError, UsageError

if TYPE_CHECKING:
    from paramctl.sources.base import OpenOptions

__all__ = ["OutputError", "exit_now", "fast_main", "internal_error_line", "one_line",
           "output_format", "prefill_for_init", "result_output", "run_list", "warn"]


def one_line(text: str) -> str:
    """Escape newlines and other control characters (names come from untrusted files)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def internal_error_line(exc: BaseException) -> str:
    """What a bug (an exception that is not a ParamctlError) prints, without --debug."""
    return (f"error: internal error: {type(exc).__name__}: {one_line(str(exc))} (run again "
            "with --debug for the traceback, and please report it)\n")


def output_format(fmt: str | None, allowed: tuple[str, ...]) -> str:
    """``fmt`` checked against ``allowed``; by default a table on a terminal, else tsv."""
    if fmt is None:
        return "table" if sys.stdout.isatty() else "tsv"
    if fmt not in allowed:
        raise UsageError(f"unknown format {fmt!r}; choose one of {', '.join(allowed)}")
    return fmt


def warn(message: str) -> None:
    sys.stderr.write(f"warning: {message}\n")


class OutputError(ParamctlError):
    """Standard output cannot take the result (closed, full, or a broken pipe)."""


def _why(exc: OSError) -> str:
    if exc.errno == errno.EBADF:
        return "standard output is closed"
    if exc.errno == errno.ENOSPC:
        return "no space left on the device standard output writes to"
    if exc.errno == errno.EPIPE:
        return "standard output was closed by the reader"
    return f"cannot write to standard output: {exc.strerror or exc}"


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null so the interpreter's final flush of what is still buffered
    neither fails nor prints a second error."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)


@contextlib.contextmanager
def result_output(written: Path | None = None) -> Iterator[TextIO]:
    """Standard output for a command's result.

    Before anything is committed (``written`` is ``None``: a listing, a dry run), an
    unwritable stdout is an error (exit 1, one line). After a committed write, a closed,
    full or broken stdout is only a warning: the file is saved, and the exit code says so
    (0). A ``list`` into ``head`` still dies of SIGPIPE (141), as Unix tools do.
    """
    if written is not None:
        # The report of a finished write must not turn a saved file into exit 141.
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        yield sys.stdout
        sys.stdout.flush()
    except OSError as exc:
        _silence_stdout()
        if written is None:
            raise OutputError(f"cannot print the result: {_why(exc)}") from None
        warn(f"could not print the report ({_why(exc)}); {written} was written")


def run_list(source: str, patterns: Sequence[str], *, options: Callable[[], OpenOptions],
             trainable: bool = False, frozen: bool = False, tree: bool = False,
             depth: int | None = None, fmt: str | None = None, headers: bool | None = None,
             exclude: Sequence[str] = (), allow_empty: bool = False,
             strip_prefix: Sequence[str] | None = None, width: int | None = None,
             summary: bool = False, fail_if_any: bool = False, quiet: bool = False) -> int:
    """The body of ``paramctl list``; returns the exit code (4 when ``fail_if_any`` finds a
    selection). ``options`` builds the open options when they are needed (after the checks
    of the other arguments, so errors come in one order)."""
    from paramctl.core import inspect
    from paramctl.render import LIST_FORMATS, PICTURE_FORMATS, render_inventory, render_tree

    if trainable and frozen:
        raise UsageError("--trainable and --frozen exclude each other")
    if depth is not None and not tree:
        raise UsageError("--depth applies to --tree")
    if summary and (tree or fmt is not None):
        raise UsageError("--summary prints one line of its own; drop --tree and -f")
    kind = output_format(fmt, LIST_FORMATS)
    if kind in PICTURE_FORMATS and (tree or depth is not None):
        raise UsageError(f"-f {kind} always draws the module tree; drop "
                         f"{'--tree' if tree else '--depth'}")
    inv = inspect(source, patterns, excludes=exclude, options=options(), prefix=strip_prefix,
                  trainable=True if trainable else False if frozen else None,
                  allow_empty=allow_empty)
    show_headers = headers if headers is not None else kind != "tsv"
    if not (fail_if_any and quiet):
        with result_output() as out:
            if summary:
                from paramctl.render.common import trainable_summary

                out.write(trainable_summary(inv.params) + "\n")
            elif tree:
                render_tree(inv, kind, out, depth=depth, headers=show_headers, width=width)
            else:
                render_inventory(inv, kind, out, headers=show_headers, width=width)
    if fail_if_any and inv.params:
        if not quiet:
            n = len(inv.params)
            first = ", ".join(p.name for p in inv.params[:3])
            more = f" (+{n - 3} more)" if n > 3 else ""
            sys.stderr.write(one_line(f"check failed (--fail-if-any): {n} tensor"
                                      f"{'s' if n != 1 else ''} selected: {first}{more}")
                             + "\n")
        return 4
    return 0


# -- parsing the common `list` command lines by hand ------------------------------------
_FLAGS = {"--trainable": ("trainable", True), "--frozen": ("frozen", True),
          "--tree": ("tree", True), "--allow-empty": ("allow_empty", True),
          "--headers": ("headers", True), "--no-headers": ("headers", False)}
_VALUED = {"-f": "fmt", "--format": "fmt", "--depth": "depth", "-x": "exclude",
           "--exclude": "exclude", "--key": "key", "--width": "width"}
_INTS = {"depth": 1, "width": 0}  # smallest value the Typer app accepts


def parse_list(args: Sequence[str]) -> dict[str, Any] | None:
    """The arguments of ``list`` (without the word) as keywords, or ``None`` when this
    parser is not sure to read them exactly as the Typer app would."""
    found: dict[str, Any] = {"exclude": [], "patterns": []}
    positional: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if not token.startswith("-") or token == "-":
            if not token or token == "-":
                return None
            positional.append(token)
            continue
        name, eq, value = token.partition("=") if token.startswith("--") else (token, "", "")
        if name in _FLAGS and not eq:
            key, flag = _FLAGS[name]
            found[key] = flag
            continue
        if name not in _VALUED:
            return None  # --help, --debug, --arg, an option added later, a typo, `--`
        if not eq:
            if i >= len(args):
                return None
            value = args[i]
            i += 1
        if value.startswith("-"):
            return None
        key = _VALUED[name]
        if key in _INTS:
            if not (value.isascii() and value.isdigit()) or int(value) < _INTS[key]:
                return None
            found[key] = int(value)
        elif key == "exclude":
            found[key].append(value)
        else:
            found[key] = value
    if not positional:
        return None
    found["source"], found["patterns"] = positional[0], positional[1:]
    return found


def _fast_list(args: Sequence[str]) -> int | None:
    """Run ``list`` without Typer; ``None`` when the Typer app must take this line."""
    parsed = parse_list(args)
    if parsed is None:
        return None
    key = parsed.pop("key", None)

    def options() -> OpenOptions:
        from paramctl.sources.base import OpenOptions

        return OpenOptions(key=key)

    source = parsed.pop("source")
    from paramctl.sources.detect import module as is_module_path

    if not is_module_path(source):
        # A short-lived process that builds a few hundred thousand long-lived objects
        # (a 100,000-tensor header) and frees them at exit: the cyclic collector would
        # rescan them again and again and find nothing (a third of the time). A module
        # source builds a model, so it keeps the collector.
        gc.disable()
    try:
        return run_list(source, parsed.pop("patterns"), options=options, **parsed)
    except ParamctlError as exc:
        sys.stderr.write(f"error: {one_line(str(exc))}\n")
        return exc.exit_code


# -- init: copy the file while torch imports -------------------------------------------
_INIT_VALUED = {"-o", "--output", "--seed", "-f", "--format", "--key", "--strip-prefix"}
_INIT_FLAGS = {"--allow-empty", "--headers", "--no-headers", "-q", "--quiet"}


def prefill_for_init(args: Sequence[str]) -> None:
    """For ``init SRC.safetensors RULE... [-o OUT.safetensors]``, start copying SRC beside
    its output in the background (:func:`paramctl.io.files.start_prefill`): ``init``
    spends its first second importing torch to check its rules, and the file it writes is
    mostly SRC's bytes. The writer takes the copy only when its output starts as exactly
    that; nothing here decides what the command does. Unusual lines get no head start."""
    if args[:1] != ["init"] or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return
    positional: list[str] = []
    out = None
    i = 1
    while i < len(args):
        token = args[i]
        i += 1
        name, eq, value = token.partition("=") if token.startswith("--") else (token, "", "")
        if not token.startswith("-"):
            positional.append(token)
        elif name in _INIT_VALUED:
            if not eq:
                if i >= len(args):
                    return
                value = args[i]
                i += 1
            if name in ("-o", "--output"):
                out = value
        elif token not in _INIT_FLAGS:
            return  # --dry-run, --max-shard-size, --arg, --weights, a typo: no head start
    if len(positional) < 2:
        return
    source = positional[0]
    target = out if out is not None else source
    if not (source.endswith(".safetensors") and target.endswith(".safetensors")
            and os.path.isfile(source) and not os.path.isdir(target)):
        return
    from pathlib import Path

    from paramctl.io.files import start_prefill

    start_prefill(Path(source), Path(target))


def install_signal_handlers() -> None:
    # A size limit must surface as an error and a clean-up, not kill the process.
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # Piped into `head`: die quietly of SIGPIPE like other Unix tools. Rewrites finish
    # (atomically) before anything is printed, so this never cuts a save short.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)


def exit_now(code: int) -> None:
    """Exit with ``code`` once the output is out, skipping the interpreter's teardown.

    Tearing down every module and freeing every object one by one is a tenth of a small
    ``list``'s time, and 0.4 s after torch was imported (``python -c "import torch"``:
    1.28 s; with this: 0.86 s). Nothing paramctl holds needs it: its files are written,
    fsynced and closed by then. The exit handlers still run (``atexit``: torch's,
    logging's, multiprocessing's); the teardown is kept when the output cannot be flushed
    (the interpreter reports that as it always does) or a non-daemon thread still runs.
    """
    import atexit

    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        sys.exit(code)
    threading = sys.modules.get("threading")
    if threading is not None and any(
            t is not threading.main_thread() and not t.daemon and t.is_alive()
            for t in threading.enumerate()):
        sys.exit(code)
    os._exit(code)


def fast_main(args: Sequence[str]) -> int | None:
    """Run the command line ``args`` without Typer and return its exit code, or ``None``
    when it is not one this module runs (the Typer app in :mod:`paramctl.cli` then does)."""
    if args[:1] != ["list"] or os.environ.get("PARAMCTL_DEBUG") or sys.stdout is None:
        return None
    install_signal_handlers()
    try:
        return _fast_list(args[1:])
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130
    except Exception as exc:
        sys.stderr.write(internal_error_line(exc))
        return 1
