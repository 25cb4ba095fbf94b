"""User-facing errors: the CLI prints these as one line and exits non-zero, no traceback."""

from __future__ import annotations

import warnings


class MMLesionError(Exception):
    """Base class for mistakes a user can fix (bad data, bad config, bad run folder)."""


class DataError(MMLesionError):
    """The dataset (CSV, images, masks) is not what its schema describes (a preset or a user's TOML file)."""


class ConfigError(MMLesionError):
    """An experiment config or a ``--set`` override names an unknown key or a bad value."""


class CheckpointError(MMLesionError):
    """A checkpoint or run directory cannot be used (missing, unsafe, or from another model)."""


class Note(UserWarning):
    """Something the package handled for the user and must tell them (rows dropped, values read as unknown).

    Every layer emits notes with :func:`note`; the CLI prints each distinct one once, on stderr, as a
    ``note:`` line, whatever the command. Library users see them as ordinary warnings.
    """


def note(message: str) -> None:
    """Tell the user about something handled on their behalf (see :class:`Note`)."""
    warnings.warn(message, Note, stacklevel=2)
