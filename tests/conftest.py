"""Shared fixtures: a tiny HAM10000-shaped folder written for real, and the real data when available."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from multimodal_lesion.data.constants import CLASSES, DATA_ENV, MASK_DIR, MASK_SUFFIX, METADATA_FILE


def write_tiny_ham(root: Path, n_lesions: int = 28, seed: int = 0) -> Path:
    """Write a small HAM10000-layout dataset: real JPEGs, real masks, some multi-image lesions."""
    rng = np.random.default_rng(seed)
    rows = []
    img_no = 24306
    for i in range(n_lesions):
        dx = CLASSES[i % len(CLASSES)]
        n_img = 2 if i % 3 == 0 else 1
        age = float(rng.integers(2, 17) * 5) if i % 9 else np.nan
        sex = ["male", "female", "unknown"][i % 3] if i % 5 else "male"
        loc = ["back", "face", "lower extremity", "unknown", "trunk"][i % 5]
        for _ in range(n_img):
            rows.append(dict(lesion_id=f"HAM_{i:07d}", image_id=f"ISIC_{img_no:07d}", dx=dx,
                             dx_type="histo", age=age, sex=sex, localization=loc))
            img_no += 1
    df = pd.DataFrame(rows)
    root.mkdir(parents=True, exist_ok=True)
    df.to_csv(root / METADATA_FILE, index=False)
    (root / "HAM10000_images_part_1").mkdir(exist_ok=True)
    (root / "HAM10000_images_part_2").mkdir(exist_ok=True)
    (root / MASK_DIR).mkdir(exist_ok=True)
    for k, image_id in enumerate(df.image_id):
        part = "HAM10000_images_part_1" if k % 2 == 0 else "HAM10000_images_part_2"
        arr = rng.integers(0, 255, size=(150, 200, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / part / f"{image_id}.jpg", quality=90)
        mask = np.zeros((150, 200), np.uint8)
        mask[50:100, 70:130] = 255
        Image.fromarray(mask).save(root / MASK_DIR / f"{image_id}{MASK_SUFFIX}")
    return root


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for modules of tiny models: on a busy 2-core machine threads mostly wait."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_ham(tmp_path: Path) -> Path:
    """A fresh tiny dataset per test (tests may corrupt it)."""
    return write_tiny_ham(tmp_path / "ham")


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """The real HAM10000 root from MMLESION_HAM10000; skips with a visible reason when unset."""
    value = os.environ.get(DATA_ENV)
    if not value:
        pytest.skip(f"real HAM10000 not available: set {DATA_ENV} to its root")
    root = Path(value)
    if not (root / METADATA_FILE).is_file():
        pytest.fail(f"{DATA_ENV}={value} has no {METADATA_FILE}")
    return root
