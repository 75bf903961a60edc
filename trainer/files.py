"""Reading YAML configs with user-facing errors, and replacing output files (figures too) atomically."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import yaml

from trainer.errors import UserError

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def read_yaml(path: Path, what: str) -> Any:
    """The parsed file; an unreadable file or invalid YAML is a UserError naming `what` and the path."""
    try:
        return yaml.safe_load(path.read_bytes().decode("utf-8"))
    except OSError as error:
        raise UserError(f"cannot read {what} {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {error.start} is {error.object[error.start]:#04x}): "
                        "is it the right file?") from None
    except yaml.YAMLError as error:
        raise UserError(f"{what} {path} is not valid YAML: {yaml_problem(error)}") from None


def yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's error on one line: what is wrong and where (its own message spans several)."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or getattr(error, "context", None) or str(error).split("\n")[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


@contextmanager
def atomic_output(path: Path) -> Iterator[IO[bytes]]:
    """A file to write that replaces `path` only once complete and synced.

    Readers, and a writer killed halfway, see the old file or the new one, never a mix: the
    temporary file lives in the same folder, so `os.replace` is an atomic rename.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not opened in a with: the `with handle:` below closes it, and the except still needs its name.
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",  # noqa: SIM115
                                         delete=False)
    try:
        with handle:
            os.fchmod(handle.fileno(), 0o644)  # temporary files start private; outputs are for everyone
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException as error:
        Path(handle.name).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None:
            error.filename = str(path)  # a failed write names no file: say which output it was
        raise


def write_atomic(path: Path, data: bytes | memoryview) -> None:
    with atomic_output(path) as handle:
        handle.write(data)


def save_figure(figure: Figure, path: Path) -> None:
    """Write a matplotlib figure in the format of the path's suffix (png, jpg), atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # only where figures are drawn

    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_figure(buffer, format=path.suffix.lstrip("."))
    write_atomic(path, buffer.getvalue())
