"""Stale or damaged caches are detected and rebuilt, never read as data (issue 7)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SIZE = (24, 32)


def _damage_npy(folder: Path, how: str) -> None:
    (npy,) = folder.glob("images-*.npy")
    meta = npy.with_suffix(".json")
    damage = {
        "truncated array": lambda: npy.write_bytes(npy.read_bytes()[: npy.stat().st_size // 2]),
        "garbage array": lambda: npy.write_bytes(os.urandom(npy.stat().st_size)),
        "array missing": npy.unlink,
        "description missing": meta.unlink,
        "description not JSON": lambda: meta.write_text("{"),
        "description of other images": lambda: meta.write_text(
            json.dumps({**json.loads(meta.read_text()), "image_ids": ["ISIC_0000000"]})
        ),
    }
    damage[how]()


@pytest.mark.parametrize(
    "how",
    [
        "truncated array",
        "garbage array",
        "array missing",
        "description missing",
        "description not JSON",
        "description of other images",
    ],
)
def test_damaged_image_cache_is_detected_and_rebuilt(
    tiny_ham: Path, tmp_path: Path, how: str, temp_files: Callable[[Path], list[str]]
) -> None:
    from multimodal_lesion.data.cache import image_array
    from multimodal_lesion.data.ham10000 import read_ham10000

    data = read_ham10000(tiny_ham)
    clean = np.array(image_array(data, SIZE, tmp_path / "cache"))
    _damage_npy(tmp_path / "cache", how)
    again = image_array(data, SIZE, tmp_path / "cache")
    np.testing.assert_array_equal(np.array(again), clean)
    assert temp_files(tmp_path / "cache") == []


def test_image_cache_goes_stale_when_the_data_changes(tiny_ham: Path, tmp_path: Path) -> None:
    from multimodal_lesion.data.cache import decode_resized, image_array
    from multimodal_lesion.data.ham10000 import read_ham10000

    before = read_ham10000(tiny_ham)
    fingerprint = before.fingerprint
    old = np.array(image_array(before, SIZE, tmp_path))
    path = Path(before.metadata.path[3])
    rng = np.random.default_rng(99)
    Image.fromarray(rng.integers(0, 255, (150, 200, 3), dtype=np.uint8)).save(path, quality=60)  # another size
    after = read_ham10000(tiny_ham)
    assert after.fingerprint != fingerprint
    new = np.array(image_array(after, SIZE, tmp_path))
    np.testing.assert_array_equal(new[3], decode_resized(str(path), SIZE))
    assert not np.array_equal(new[3], old[3])
    np.testing.assert_array_equal(np.delete(new, 3, 0), np.delete(old, 3, 0))


def test_damaged_embedding_cache_is_detected_and_rebuilt(tiny_ham: Path, tmp_path: Path) -> None:
    import torch

    from multimodal_lesion.data.cache import image_array
    from multimodal_lesion.data.datasets import Normalize
    from multimodal_lesion.data.ham10000 import read_ham10000
    from multimodal_lesion.models.image_branch import ImageBranch
    from multimodal_lesion.runs import cached_embeddings

    data = read_ham10000(tiny_ham)
    images = image_array(data, SIZE, tmp_path / "images")
    torch.manual_seed(0)
    branch = ImageBranch("test_resnet", "none")
    kwargs = dict(
        folder=tmp_path / "emb",
        fingerprint=data.fingerprint,
        identity={"backbone": "test_resnet"},
        flip_average=False,
        show=False,
    )
    normalize = Normalize(branch.data_config["mean"], branch.data_config["std"])
    clean = cached_embeddings(branch, lambda: images, len(images), normalize, **kwargs)
    (npy,) = (tmp_path / "emb").glob("embeddings-*.npy")
    npy.write_bytes(npy.read_bytes()[: npy.stat().st_size // 2])  # a damaged cache file
    np.testing.assert_array_equal(cached_embeddings(branch, lambda: images, len(images), normalize, **kwargs), clean)
