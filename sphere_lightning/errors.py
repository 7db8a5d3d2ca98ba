"""Mistakes a user can fix — a bad flag, a bad data file — and how the command line reports them.

Every check of user input raises a :class:`UserInputError` whose message names what to change:
the flag and the bad value (:class:`ConfigError`), or the file, record and field
(:class:`DataError`). All are ``ValueError`` subclasses, so ``except ValueError`` keeps working.
``python -m sphere_lightning`` prints such an error as one paragraph, ``error: <message>``, and
exits with code 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Exit code of a run stopped by a :class:`UserInputError` (argparse's, for a bad command line).
USER_ERROR_EXIT_CODE = 2
#: Exit code of a run stopped by one of the extra error types given to :func:`exit_on_user_error`.
RUN_ERROR_EXIT_CODE = 1


#: Where the editor's options sit in a config: ``model.editor.init_args``.
EDITOR_ARGS = "model.editor.init_args"


def flag(*path: str) -> str:
    """A setting as every message names it: its dotted config path in backticks.

    The path is the YAML key path and, with ``--`` in front, the command-line flag
    (`` `model.editor.init_args.statistics.corpus` ``). A callback in ``trainer.callbacks`` is
    addressed by its class name, as an experiment suite's ``set`` keys address it
    (`` `trainer.callbacks.HEAlarmCallback.init_args.band.k` ``).

    Args:
        path: The parts of the path, joined with dots (a part may itself be dotted).
    """
    return "`" + ".".join(path) + "`"


def editor_flag(*name: str) -> str:
    """:func:`flag` of an editor option: `` `model.editor.init_args.<name>` ``."""
    return flag(EDITOR_ARGS, *name)


def callback_flag(callback: str, *name: str) -> str:
    """:func:`flag` of a callback's option:
    `` `trainer.callbacks.<callback>.init_args.<name>` ``."""
    return flag("trainer.callbacks", callback, "init_args", *name)


class UserInputError(ValueError):
    """A mistake in what the user gave; the message says what is wrong and where."""


class ConfigError(UserInputError):
    """A bad flag or config value; the message names the flag and the bad value."""


class DataError(UserInputError):
    """A bad data file, record or field; the message names the file (and record and field)."""


class MissingFileError(UserInputError, FileNotFoundError):
    """A file a flag names does not exist (also a ``FileNotFoundError``)."""


class MissingPackageError(ConfigError, ModuleNotFoundError):
    """A model or feature needs a package that is not installed; the message gives the command
    that installs it (also a ``ModuleNotFoundError``)."""


def find_reported_error(
    error: BaseException, types: tuple[type[BaseException], ...] = (UserInputError,)
) -> BaseException | None:
    """``error`` itself or the first exception it wraps (``__cause__``, else ``__context__``)
    that is one of ``types``; ``None`` when there is none.

    jsonargparse, for instance, re-raises a callback's ``ConfigError`` as a plain ``ValueError``
    "Does not validate against any of the Union subtypes" whose cause is the ``ConfigError``.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, types):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


@contextmanager
def exit_on_user_error(*also: type[BaseException]) -> Iterator[None]:
    """Report a :class:`UserInputError` raised inside the block (or wrapped by another
    exception) as ``error: <message>`` on stderr and exit with code 2, without a traceback.

    Args:
        also: Further exception types reported the same way but with exit code 1 (e.g. a
            ΔW with NaN/inf: not a mistake in the input, yet fully explained by its message).
            Anything else propagates with its traceback.
    """
    try:
        yield
    except Exception as error:
        reported = find_reported_error(error, (UserInputError, *also))
        if reported is None:
            raise
        user = isinstance(reported, UserInputError)
        print(f"error: {str(reported) or type(reported).__name__}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT_CODE if user else RUN_ERROR_EXIT_CODE)


def check_writable_folder(folder: str | Path, flag: str) -> None:
    """Raise a :class:`ConfigError` naming ``flag`` unless ``folder`` is a writable folder or
    can be created as one. Nothing is left behind: a probe file is created and removed in the
    nearest folder that exists.

    Args:
        folder: The folder a run will write into.
        flag: The flag (or environment variable) that sets it, for the message.
    """
    path = Path(folder).expanduser()
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"`{flag}` is {str(folder)!r}, but {existing} is a file, not a folder: point "
            f"`{flag}` at a folder"
        )
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        where = "it" if existing == path else f"its parent {existing}"
        raise ConfigError(
            f"`{flag}` is {str(folder)!r}, but {where} is not writable ({error.strerror}): "
            f"point `{flag}` at a folder you can write to"
        ) from None
