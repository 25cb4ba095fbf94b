"""Paths from the data never leave the data root: links, linked folders, hostile image ids (issue 7)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from multimodal_lesion.data.constants import MASK_DIR, MASK_SUFFIX, METADATA_FILE


def _outside_jpeg(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "secret.jpg"
    Image.fromarray(np.zeros((150, 200, 3), np.uint8)).save(path)
    return path


def test_image_link_to_outside_the_root_is_refused(tiny_ham: Path, tmp_path: Path) -> None:
    from multimodal_lesion.data.ham10000 import read_ham10000
    from multimodal_lesion.errors import DataError

    image = next(tiny_ham.rglob("*.jpg"))
    image.unlink()
    image.symlink_to(_outside_jpeg(tmp_path / "outside"))
    with pytest.raises(DataError, match="outside the data root"):
        read_ham10000(tiny_ham)


def test_mask_link_to_outside_the_root_is_refused(tiny_ham: Path, tmp_path: Path) -> None:
    from multimodal_lesion.data.ham10000 import read_ham10000
    from multimodal_lesion.errors import DataError

    mask = next((tiny_ham / MASK_DIR).glob(f"*{MASK_SUFFIX}"))
    mask.unlink()
    mask.symlink_to(_outside_jpeg(tmp_path / "outside"))
    with pytest.raises(DataError, match="outside the data root"):
        read_ham10000(tiny_ham)


def test_linked_folder_outside_the_root_is_not_followed(tiny_ham: Path, tmp_path: Path) -> None:
    from multimodal_lesion.data.ham10000 import read_ham10000
    from multimodal_lesion.errors import DataError

    part = tiny_ham / "HAM10000_images_part_2"
    moved = shutil.move(str(part), str(tmp_path / "elsewhere"))
    part.symlink_to(moved, target_is_directory=True)
    with pytest.raises(DataError, match="not found"):  # its images are not taken from outside the root
        read_ham10000(tiny_ham)
    data = read_ham10000(tiny_ham, drop_missing=True)
    assert any("linked folder" in n for n in data.notes)
    assert all(Path(p).resolve().is_relative_to(tiny_ham.resolve()) for p in data.metadata.path)


def test_links_inside_the_root_are_fine_and_every_path_stays_inside(tiny_ham: Path) -> None:
    from multimodal_lesion.data.ham10000 import read_ham10000

    image = next(tiny_ham.rglob("*.jpg"))
    copy = tiny_ham / "originals" / image.name.replace(".jpg", ".jpeg.bak")
    copy.parent.mkdir()
    shutil.move(image, copy)
    image.symlink_to(copy)
    data = read_ham10000(tiny_ham)
    root = tiny_ham.resolve()
    paths = [Path(p) for col in ("path", "mask_path") for p in data.metadata[col] if p]
    assert paths and all(p.resolve().is_relative_to(root) for p in paths)


@pytest.mark.parametrize("bad_id", ["../../outside/secret", "..", "HAM10000_images_part_1/../../x", "/tmp/x"])
def test_image_id_cannot_point_outside_the_root(tiny_ham: Path, tmp_path: Path, bad_id: str) -> None:
    from multimodal_lesion.data.ham10000 import read_ham10000
    from multimodal_lesion.errors import DataError

    _outside_jpeg(tmp_path / "outside")
    df = pd.read_csv(tiny_ham / METADATA_FILE, dtype=str, keep_default_na=False)
    df.loc[0, "image_id"] = bad_id
    df.to_csv(tiny_ham / METADATA_FILE, index=False)
    with pytest.raises(DataError, match=r"row 1 \(line 2\), column 'image_id'.*not a plain id"):
        read_ham10000(tiny_ham)
