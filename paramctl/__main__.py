"""``python -m paramctl``, and the ``paramctl`` console script: ``list`` without Typer where
:mod:`paramctl.fastcli` can (start-up time), else the Typer app of :mod:`paramctl.cli`."""

from __future__ import annotations

import gc
import sys

from paramctl.fastcli import exit_now, fast_main, prefill_for_init


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    code = fast_main(args)
    if code is not None:
        exit_now(code)
    prefill_for_init(args)
    # A rewrite of a 100,000-tensor header builds a few hundred thousand long-lived objects
    # in a burst; at the default threshold (700) the cyclic collector rescans them again and
    # again (40 % of a `freeze` of such a file). Collect a hundred times less often.
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
