"""The frozen embedding pass: flips in one batch, the inference backends, bfloat16 kept apart in the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from multimodal_lesion.config import load_config
from multimodal_lesion.data.datasets import Normalize
from multimodal_lesion.errors import ConfigError
from multimodal_lesion.models import FLIPS, ImageBranch, embed_images
from multimodal_lesion.models.inference import BranchPass, compile_pass
from multimodal_lesion.runs import cached_embeddings, compute_embeddings
from multimodal_lesion.runs.embeddings import embedding_identity

SIZE = (64, 96)


@pytest.fixture(scope="module")
def branch() -> ImageBranch:
    torch.manual_seed(0)
    return ImageBranch("tf_efficientnet_lite0", "none", multiscale=True).eval()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(6, *SIZE, 3), dtype=np.uint8)


def normalize(branch: ImageBranch) -> Normalize:
    return Normalize(branch.data_config["mean"], branch.data_config["std"])


def test_flips_in_one_batch_equal_the_mean_of_the_flipped_passes(branch: ImageBranch) -> None:
    x = torch.randn(3, 3, *SIZE)
    with torch.no_grad():
        one_by_one = torch.stack([branch.embed(x.flip(d) if d else x) for d in FLIPS]).mean(0)
        together = embed_images(branch, x, flip_average=True)
    assert together.shape == (3, branch.num_features)
    torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=1e-5)


def test_compute_embeddings_matches_the_live_branch_whatever_the_batch(branch: ImageBranch, images) -> None:
    norm = normalize(branch)
    x = norm(torch.from_numpy(images).permute(0, 3, 1, 2))
    with torch.no_grad():
        live = embed_images(branch, x, flip_average=True).numpy()
    for batch in (1, 4, 6):  # a last short batch too
        out = compute_embeddings(branch, images, norm, flip_average=True, batch_size=batch, show=False)
        np.testing.assert_allclose(out, live, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_exported_backends_give_the_eager_embeddings_to_1e3(branch: ImageBranch, backend: str) -> None:
    pytest.importorskip(backend)
    x = torch.randn(5, 3, *SIZE)
    with torch.no_grad():
        eager = branch.embed(x)
    exported = compile_pass(BranchPass(branch, "embed"), x[:2], backend)(x)  # traced on 2, run on 5 (dynamic batch)
    assert exported.shape == eager.shape
    assert float((exported - eager).abs().max()) <= 1e-3


def test_bfloat16_runs_but_is_a_different_cached_artefact(branch: ImageBranch, images, tmp_path) -> None:
    norm = normalize(branch)
    fp32 = embedding_identity("tf_efficientnet_lite0", "none", True, SIZE, "float32")
    bf16 = embedding_identity("tf_efficientnet_lite0", "none", True, SIZE, "bfloat16")
    # float32 keeps the identity caches had before precision existed; bfloat16 is named
    assert fp32 == {"backbone": "tf_efficientnet_lite0", "weights": "none", "multiscale": True, "size": list(SIZE)}
    assert bf16["precision"] == "bfloat16"
    common = dict(n=len(images), folder=tmp_path, fingerprint="f", flip_average=False, batch_size=3, show=False)
    a = cached_embeddings(branch, lambda: images, normalize=norm, identity=fp32, **common)
    b = cached_embeddings(branch, lambda: images, normalize=norm, identity=bf16, precision="bfloat16", **common)
    assert len(list(tmp_path.glob("embeddings-*.npy"))) == 2  # never the float32 file for a bfloat16 request
    moved = np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)
    assert 0 < moved.max() < 0.2  # bfloat16 rounding moves every embedding a little, not into other features
    again = cached_embeddings(branch, lambda: pytest.fail("recomputed"), normalize=norm, identity=bf16, **common)
    np.testing.assert_array_equal(again, b)


def test_unknown_or_mismatched_backend_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="embed_precision"):
        load_config(None, ['train.embed_backend="openvino"', 'train.embed_precision="bfloat16"'])
    with pytest.raises(ConfigError, match="embed_backend"):
        load_config(None, ['train.embed_backend="tensorrt"'])
    with pytest.raises(ConfigError, match="unknown backend"):
        compile_pass(torch.nn.Identity(), torch.zeros(1, 3, 8, 8), "tensorrt")
