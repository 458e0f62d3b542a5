"""Every error paramctl raises on purpose, each carrying its exit code.

The CLI catches only :class:`ParamctlError` and prints ``error: <message>``; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "CorruptFileError",
    "NoMatchError",
    "OperationError",
    "ParamctlError",
    "ParamctlWarning",
    "SourceError",
    "UnsafeFileError",
    "UsageError",
    "WriteError",
]


class ParamctlError(Exception):
    """Base of every expected failure; ``exit_code`` follows DESIGN.md."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class SourceError(ParamctlError):
    """The source cannot be opened: missing, unknown kind, bad module path."""


class CorruptFileError(SourceError):
    """The file exists but is not a valid checkpoint of its kind."""


class UnsafeFileError(SourceError):
    """Reading the file would run code from it (needs ``--unsafe-load``)."""


class WriteError(ParamctlError):
    """Saving failed; the original file is untouched."""


class OperationError(ParamctlError):
    """The requested change cannot be applied (integer tensor, bad shape for init...)."""


class UsageError(ParamctlError):
    """Bad option, bad rule syntax, unknown init function."""

    exit_code = 2


class NoMatchError(ParamctlError):
    """A pattern selected nothing."""

    exit_code = 3


class ParamctlWarning(UserWarning):
    """Something the caller should know that does not stop the operation (a prefix that
    matches no name, frozen names the model lacks). The library issues these through
    :mod:`warnings`; the CLI prints them as ``warning: ...`` lines (``-q`` hides them)."""
