"""Errors caused by the user's input: printed as one line, never as a traceback."""

from __future__ import annotations

import errno
import os

import click


class UserError(click.ClickException):
    """A mistake in the user's input (a flag, a file, a dataset).

    Raising it anywhere ends the program with `Error: <message>` and exit code 2 when
    it reaches a click entry point; the message names the bad value and what to do.
    """

    exit_code = 2


class CannotWrite(UserError):
    """The disk is full, over quota or read-only: nothing the program can retry its way out of.

    Exit code 74 (sysexits' EX_IOERR), which evolvectl's local supervisor does not restart.
    """

    exit_code = 74
    errnos = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})

    @classmethod
    def from_os_error(cls, error: OSError, path: str | os.PathLike[str] | None = None) -> CannotWrite | None:
        """The one-line error for an OSError that says the storage cannot take writes, else None."""
        if error.errno not in cls.errnos:
            return None
        where = error.filename or path or "the run folder"
        fix = ("make it writable" if error.errno == errno.EROFS else "free space there (or raise the quota)")
        return cls(f"cannot write {where}: {error.strerror} ({errno.errorcode[error.errno]}); {fix}, "
                   "then start again. Nothing written before was lost")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run cannot go on."""
