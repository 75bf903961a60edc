"""Errors caused by the user's input: printed as one line, never as a traceback."""

from __future__ import annotations

import click


class UserError(click.ClickException):
    """A mistake in the user's input (a flag, a file, a dataset).

    Raising it anywhere ends the program with `Error: <message>` and exit code 2 when
    it reaches a click entry point; the message names the bad value and what to do.
    """

    exit_code = 2


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run cannot go on."""
