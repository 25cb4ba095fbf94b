"""User-facing errors: the CLI prints these as one line and exits non-zero, no traceback."""

from __future__ import annotations


class MMLesionError(Exception):
    """Base class for mistakes a user can fix (bad data, bad config, bad run folder)."""


class DataError(MMLesionError):
    """The dataset (CSV, images, masks) is not what HAM10000 should look like."""


class ConfigError(MMLesionError):
    """An experiment config or a ``--set`` override names an unknown key or a bad value."""


class CheckpointError(MMLesionError):
    """A checkpoint or run directory cannot be used (missing, unsafe, or from another model)."""
