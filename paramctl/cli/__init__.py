"""The Typer app: one module per command, registered here. Only ``cli/`` knows Typer."""

from __future__ import annotations

import os
import signal
import sys
from typing import Annotated

import typer

from paramctl import __version__
from paramctl.cli.freeze_cmd import (
    FREEZE_EXAMPLES,
    UNFREEZE_EXAMPLES,
    freeze_command,
    unfreeze_command,
)
from paramctl.cli.init_cmd import APPLY_EXAMPLES, INIT_EXAMPLES, apply_command, init_command
from paramctl.cli.list_cmd import EXAMPLES as LIST_EXAMPLES
from paramctl.cli.list_cmd import list_command

__all__ = ["app", "main"]

HELP = """Look inside PyTorch models and checkpoints, and decide which parameters train.

Examples:

  paramctl list ckpt.pt --trainable

  paramctl freeze ckpt.pt 'backbone.*' --exclude 'backbone.layer4'

  paramctl init ckpt.pt 'head.*.weight=normal(std=0.02)' '*.bias=zeros' --seed 0

Exit codes: 0 ok, 1 input or operation failed, 2 usage error, 3 a pattern matched nothing.
"""

app = typer.Typer(
    help=HELP,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"paramctl {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")]
    = False,
) -> None:
    """Look inside PyTorch models and checkpoints, and decide which parameters train."""


app.command("list", epilog=LIST_EXAMPLES)(list_command)
app.command("freeze", epilog=FREEZE_EXAMPLES)(freeze_command)
app.command("unfreeze", epilog=UNFREEZE_EXAMPLES)(unfreeze_command)
app.command("init", epilog=INIT_EXAMPLES)(init_command)
app.command("apply", epilog=APPLY_EXAMPLES)(apply_command)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors, documented exit codes."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or bool(os.environ.get("PARAMCTL_DEBUG"))
    # A size limit must surface as an error and a clean-up, not kill the process.
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    command = typer.main.get_command(app)
    try:
        code = command.main(args, prog_name="paramctl", standalone_mode=False)
    except typer._click.exceptions.UsageError as exc:  # type: ignore[attr-defined]
        hint = f" (see 'paramctl {exc.ctx.info_name} --help')" if exc.ctx and exc.ctx.parent \
            else " (see 'paramctl --help')"
        sys.stderr.write(f"error: {exc.format_message()}{hint}\n")
        code = 2
    except typer._click.exceptions.Abort:  # type: ignore[attr-defined]
        sys.stderr.write("error: interrupted\n")
        code = 130
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        code = 130
    except BrokenPipeError:
        # The reader (head, grep -q) went away: that is not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 0
    except Exception as exc:
        if debug:
            raise
        sys.stderr.write(f"error: internal error: {type(exc).__name__}: {exc} (run again with "
                         "--debug for the traceback, and please report it)\n")
        code = 1
    sys.exit(code if isinstance(code, int) else 0)
