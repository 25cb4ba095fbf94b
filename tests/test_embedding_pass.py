"""The frozen embedding pass: flips in one batch, the inference backends (``auto``, the default, resolved once
per run), bfloat16 kept apart in the cache."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from multimodal_lesion.config import load_config, replace
from multimodal_lesion.data.datasets import Normalize
from multimodal_lesion.errors import ConfigError
from multimodal_lesion.models import FLIPS, ImageBranch, embed_images
from multimodal_lesion.models.inference import BranchPass, backend_available, compile_pass, resolve_backend
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
    assert load_config(None, ['train.embed_precision="bfloat16"']).train.embed_backend == "auto"  # picks torch


#: Resolves ``auto`` with OpenVINO unimportable, then with ONNX Runtime unimportable too (a real interpreter).
WITHOUT_EXPORTED = """
import sys
from multimodal_lesion.config import load_config
from multimodal_lesion.runs import with_concrete_backend
sys.modules["openvino"] = None
print(with_concrete_backend(load_config(None, ['train.device="cpu"'])).train.embed_backend)
sys.modules["onnxruntime"] = None
print(with_concrete_backend(load_config(None, ['train.device="cpu"'])).train.embed_backend)
"""


def test_auto_picks_the_fastest_backend_that_imports_and_torch_where_only_torch_applies() -> None:
    assert backend_available("openvino"), "the test extra installs openvino"
    assert resolve_backend("auto") == "openvino"
    assert resolve_backend("auto", device=torch.device("cpu")) == "openvino"
    assert resolve_backend("auto", "bfloat16") == "torch"  # autocast is torch's
    assert resolve_backend("auto", device=torch.device("cuda")) == "torch"  # the exported graphs run on the CPU
    assert resolve_backend("onnxruntime", device=torch.device("cuda")) == "onnxruntime"  # a named one stays named
    proc = subprocess.run([sys.executable, "-c", WITHOUT_EXPORTED], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    without_openvino = "onnxruntime" if backend_available("onnxruntime") else "torch"
    assert proc.stdout.split() == [without_openvino, "torch"]


def test_a_frozen_run_trained_by_default_records_its_backend_and_embeds_like_eager_torch(
    tmp_path: Path, tiny_ham_factory: Callable[..., Path], tiny_run_settings: list[str], single_thread
) -> None:
    """The default (``auto``) is resolved once: config.toml names the backend that ran, the cached embeddings
    equal eager torch's to 1e-3, and a run written before ``auto`` (no key, or "torch") reloads with torch."""
    from multimodal_lesion.runs import RunFolder, load_run
    from multimodal_lesion.training.runner import train_run

    root = tiny_ham_factory(tmp_path / "dataset", n_lesions=16)
    cfg = load_config(None, [*tiny_run_settings, f'data.root="{root}"', f'data.cache_dir="{tmp_path / "cache"}"'])
    assert cfg.train.embed_backend == "auto" and cfg.train.mode == "frozen"
    out = tmp_path / "run"
    train_run(cfg, out, show=False)
    folder = RunFolder(out)
    assert 'embed_backend = "openvino"' in (out / "config.toml").read_text()
    assert json_backends(tmp_path / "cache") == {"openvino"}  # the cache's description names it too
    inputs = load_run(out).inputs
    assert inputs.cfg.train.embed_backend == "openvino"
    rows = np.arange(len(inputs.image_ids))
    with torch.no_grad():
        eager = embed_images(inputs.model.image_branch, inputs.normalized_images(rows), flip_average=True).numpy()
    np.testing.assert_allclose(inputs.embeddings(show=False), eager, atol=1e-3, rtol=1e-3)
    folder.check_resume(replace(folder.read_config(), train={"embed_backend": "torch"}))  # same numbers, same cache
    text = (out / "config.toml").read_text()
    for written in (text.replace('embed_backend = "openvino"', 'embed_backend = "torch"'), drop_line(text)):
        (out / "config.toml").write_text(written)
        assert folder.read_config().train.embed_backend == "torch"
        assert load_run(out).inputs.cfg.train.embed_backend == "torch"


def json_backends(cache: Path) -> set[str]:
    """The backends named beside the cached embeddings under ``cache``."""
    import json

    return {json.loads(p.read_text())["backend"] for p in cache.rglob("embeddings-*.json")}


def drop_line(toml: str, key: str = "embed_backend") -> str:
    """``toml`` without the line setting ``key`` (a config written before the key existed)."""
    return "\n".join(line for line in toml.splitlines() if not line.startswith(f"{key} ="))
