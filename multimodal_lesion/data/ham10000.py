"""HAM10000 as released, read by the one generic reader through its preset.

Every HAM10000 rule (the release's seven columns, plain lesion and image ids, the seven classes, ages
from 0 to 120, the sex and localization vocabularies, masks named ``<image>_segmentation.png``) is said
by the ``ham10000`` schema (:func:`~multimodal_lesion.data.schema.ham10000`) and applied by
:func:`~multimodal_lesion.data.reader.read_dataset`; :func:`read_ham10000` is kept as a short name for
that call.
"""

from __future__ import annotations

from pathlib import Path

from .dataset import LesionDataset
from .reader import read_dataset
from .schema import preset


def read_ham10000(root: str | Path, *, drop_missing: bool = False, images: str | Path | None = None) -> LesionDataset:
    """Read a HAM10000-layout folder: ``read_dataset(root, preset("ham10000"))``.

    Args:
        root: the data root (official layout: CSV at the root, images in any sub-folder).
        drop_missing: drop rows whose image is not found (reported in ``notes``) instead of failing.
        images: the folder the images (and masks) are below, when not ``root``.

    Raises:
        DataError: one line naming the file / row / column of the first problem found.
    """
    return read_dataset(root, preset("ham10000"), images=str(images or ""), drop_missing=drop_missing)


__all__ = ["read_ham10000"]
