"""The Typer app: one module per command, registered here. Only ``cli/`` knows Typer."""

from __future__ import annotations

import errno
import io
import os
import sys
from typing import Annotated

import typer

from paramctl import __version__
from paramctl.cli.common import one_line
from paramctl.cli.convert_cmd import EXAMPLES as CONVERT_EXAMPLES
from paramctl.cli.convert_cmd import convert_command
from paramctl.cli.freeze_cmd import (
    FREEZE_EXAMPLES,
    UNFREEZE_EXAMPLES,
    freeze_command,
    unfreeze_command,
)
from paramctl.cli.init_cmd import APPLY_EXAMPLES, INIT_EXAMPLES, apply_command, init_command
from paramctl.cli.list_cmd import EXAMPLES as LIST_EXAMPLES
from paramctl.cli.list_cmd import list_command
from paramctl.cli.mem_cmd import EXAMPLES as MEM_EXAMPLES
from paramctl.cli.mem_cmd import mem_command
from paramctl.cli.values_cmd import DIFF_EXAMPLES, STATS_EXAMPLES, diff_command, stats_command
from paramctl.fastcli import install_signal_handlers, internal_error_line

__all__ = ["app", "main"]

HELP = """Look inside PyTorch models and checkpoints, and decide which parameters train.

Examples:

\b
  paramctl list ckpt.pt --trainable
  paramctl freeze ckpt.pt 'blocks.*' --exclude 'blocks.1'
  paramctl init ckpt.pt 'lm_head=normal(std=0.02)' '*.bias=zeros' --seed 0
  paramctl --show-completion bash

Exit codes: 0 ok, 1 input or operation failed, 2 usage error, 3 a pattern matched nothing,
4 a check found something (stats --check, diff --exit-code, list --fail-if-any).
"""

app = typer.Typer(
    help=HELP,
    add_completion=True,
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
app.command("mem", epilog=MEM_EXAMPLES)(mem_command)
app.command("convert", epilog=CONVERT_EXAMPLES)(convert_command)
app.command("stats", epilog=STATS_EXAMPLES)(stats_command)
app.command("diff", epilog=DIFF_EXAMPLES)(diff_command)


def short_usage(command: typer.core.TyperGroup) -> str:
    """What bare ``paramctl`` prints: the usage line, the commands, where to read on."""
    ctx = typer.Context(command, info_name="paramctl")
    names = command.list_commands(ctx)
    width = max(len(n) for n in names)
    lines = ["usage: paramctl COMMAND [ARGS]...", "", "commands:"]
    for name in names:
        cmd = command.get_command(ctx, name)
        summary = cmd.get_short_help_str(limit=64) if cmd is not None else ""
        lines.append(f"  {name.ljust(width)}  {summary}")
    lines += ["", "run 'paramctl COMMAND --help' for a command's options and examples,",
              "and 'paramctl --help' for the rest (exit codes, shell completion)"]
    return "\n".join(lines) + "\n"


class _ClosedStdout(io.TextIOBase):
    """Stands in for ``sys.stdout`` when fd 1 is closed (``paramctl ... >&-``): writing
    raises EBADF, which the commands turn into an error (or, after a write, a warning)."""

    def write(self, text: str) -> int:
        raise OSError(errno.EBADF, "Bad file descriptor")

    def isatty(self) -> bool:
        return False


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors, documented exit codes."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or bool(os.environ.get("PARAMCTL_DEBUG"))
    if sys.stdout is None:
        sys.stdout = _ClosedStdout()
    install_signal_handlers()
    command = typer.main.get_command(app)
    if not args and not os.environ.get("_PARAMCTL_COMPLETE"):
        assert isinstance(command, typer.core.TyperGroup)
        sys.stderr.write(short_usage(command))
        sys.exit(2)
    try:
        code = command.main(args, prog_name="paramctl", standalone_mode=False)
        if code == 130:  # Typer turns Ctrl-C into a bare exit code
            sys.stderr.write("error: interrupted\n")
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        code = 130
    except Exception as exc:
        # Typer vendors click in some versions and not in others: match by shape.
        if getattr(exc, "exit_code", None) == 2 and hasattr(exc, "format_message"):
            ctx = getattr(exc, "ctx", None)
            where = f"paramctl {ctx.info_name}" if ctx is not None and ctx.parent else "paramctl"
            sys.stderr.write(f"error: {one_line(exc.format_message())} "
                             f"(see '{where} --help')\n")
            code = 2
        elif type(exc).__name__ == "Abort":
            sys.stderr.write("error: interrupted\n")
            code = 130
        elif debug:
            raise
        else:
            sys.stderr.write(internal_error_line(exc))
            code = 1
    sys.exit(code if isinstance(code, int) else 0)
