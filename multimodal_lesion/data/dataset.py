"""The canonical table of any dataset: one row per image, in its schema's columns."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .schema import DatasetSchema, preset


@dataclass
class LesionDataset:
    """A validated dataset in the canonical table of its schema (HAM10000's: the 7 official columns)
    plus absolute ``path`` and ``mask_path`` (see :mod:`~multimodal_lesion.data.schema`)."""

    root: Path
    metadata: pd.DataFrame = field(repr=False)
    notes: list[str] = field(default_factory=list)
    schema: DatasetSchema = field(default_factory=lambda: preset("ham10000"), repr=False)
    image_root: Path | None = None  # where the images were found, when not below ``root``

    @property
    def has_images(self) -> bool:
        """Whether every row has an image file (a metadata-only dataset has none)."""
        return bool(len(self.metadata)) and bool((self.metadata["path"] != "").all())

    @property
    def fingerprint(self) -> str:
        """Hex digest of the CSV bytes and the images' and masks' relative names and sizes.

        Cheap (one ``stat`` per file, no image bytes read) and recomputed on each access, so a
        cache keyed by it goes stale as soon as the data on disk changes.
        """
        first, *others = self.schema.metadata
        digest = hashlib.sha256((self.root / first).read_bytes())
        for name in others:
            digest.update((self.root / name).read_bytes())
        prefix = len(str(self.image_root or self.root)) + 1
        files = [p for col in ("path", "mask_path") for p in self.metadata[col] if p]
        for path in sorted(files):
            digest.update(f"\n{path[prefix:]}\t{_size_or_missing(path)}".encode())
        return digest.hexdigest()


def _size_or_missing(path: str) -> int:
    """File size, or -1 when the file has gone (so the fingerprint changes)."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return -1
