"""``python -m paramctl``, and the ``paramctl`` console script: ``list`` without Typer where
:mod:`paramctl.fastcli` can (start-up time), else the Typer app of :mod:`paramctl.cli`."""

from __future__ import annotations

import gc
import os
import sys

from paramctl.fastcli import exit_now, fast_main, prefill_for_init

_FILE_WRITES = frozenset({"freeze", "unfreeze", "init", "apply", "convert"})


def _local_file(spec: str) -> bool:
    """``spec`` names a checkpoint on disk (a file or folder), not a module path."""
    return os.path.exists(spec) and not spec.endswith(".py")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    code = fast_main(args)
    if code is not None:
        exit_now(code)
    prefill_for_init(args)
    # A rewrite of a 100,000-tensor header builds a few hundred thousand long-lived objects
    # in a burst; at the default threshold (700) the cyclic collector rescans them again and
    # again (40 % of a `freeze` of such a file), and even at a hundred times less often it
    # still costs a fifth (0.72 s against 0.59 s). A short write of a file makes no cyclic
    # garbage worth collecting: no collector then, as for `list`. A module source builds a
    # model, so any other line keeps the collector, a hundred times less often.
    if args[:1] and args[0] in _FILE_WRITES and len(args) > 1 and _local_file(args[1]):
        gc.disable()
    else:
        gc.set_threshold(100_000)
    from paramctl.cli import main as typer_main

    try:
        typer_main(argv)
    except SystemExit as exc:  # how it always ends: with the command's exit code
        if not isinstance(exc.code, int):
            raise
        exit_now(exc.code)


if __name__ == "__main__":
    main()
