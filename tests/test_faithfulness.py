"""Faithfulness measures on hand-made maps and on a planted case (a trained model with known evidence)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from multimodal_lesion.errors import ConfigError
from multimodal_lesion.explain import (
    BoundMetadata,
    GradCamExplainer,
    centre_map,
    curve_auc,
    energy_inside,
    faithfulness_report,
    perturbation_curve,
    pointing_game,
    random_map,
    randomisation_check,
    randomised_cams,
    randomised_copy,
)
from multimodal_lesion.explain.faithfulness import cascading_randomisation

pytestmark = pytest.mark.usefixtures("single_thread")


def test_true_map_beats_random_map_on_the_planted_case(planted) -> None:
    truth = planted.mask.astype(float)
    for image, meta in zip(planted.images[:2], planted.meta[:2], strict=True):
        # zeros (the training mean) for both curves: a blurred bright square is still a bright square
        report = faithfulness_report(planted.model, image, meta, truth, 1, mask=planted.mask, baseline="zero", steps=10)
        assert report["map"]["deletion_auc"] < report["random"]["deletion_auc"] - 0.2
        assert report["map"]["insertion_auc"] > report["random"]["insertion_auc"] + 0.1
        assert report["map"]["pointing_game"] == 1.0 and report["map"]["energy_inside"] == 1.0
        assert report["centre"]["pointing_game"] == 0.0  # the planted square is not central


def test_cam_beats_random_and_centre_on_deletion(planted) -> None:
    cams = GradCamExplainer(planted.model).explain(planted.images[:2], planted.meta[:2], [1, 1])
    for cam, image, meta in zip(cams, planted.images[:2], planted.meta[:2], strict=True):
        report = faithfulness_report(planted.model, image, meta, cam, 1, mask=planted.mask, seed=1)
        assert report["map"]["deletion_auc"] < report["random"]["deletion_auc"]
        assert report["map"]["deletion_auc"] < report["centre"]["deletion_auc"]
        assert report["map"]["energy_inside"] > report["centre"]["energy_inside"]


def test_curves_start_and_end_where_they_should(planted) -> None:
    image, meta = planted.images[0], planted.meta[:1]
    predict = BoundMetadata(planted.model.eval(), meta)
    with torch.no_grad():
        p_image = torch.softmax(predict(image[None]).double(), -1)[0, 1].item()
        p_zero = torch.softmax(predict(torch.zeros_like(image)[None]).double(), -1)[0, 1].item()
    sal = random_map(image.shape[-2:], seed=3)
    deletion = perturbation_curve(predict, image, sal, 1, mode="deletion", steps=10)
    insertion = perturbation_curve(predict, image, sal, 1, mode="insertion", steps=10)
    assert deletion.shape == insertion.shape == (11,)
    assert deletion[0] == pytest.approx(p_image, abs=1e-6) and insertion[-1] == pytest.approx(p_image, abs=1e-6)
    assert deletion[-1] == pytest.approx(p_zero, abs=1e-6)  # deletion ends at the training mean colour
    with pytest.raises(ConfigError, match="baseline"):
        perturbation_curve(predict, image, sal, 1, baseline="zeros")
    with pytest.raises(ConfigError, match="does not match"):
        perturbation_curve(predict, image, sal[:10], 1)


def test_curve_auc() -> None:
    assert curve_auc(np.full(21, 0.3)) == pytest.approx(0.3)
    assert curve_auc(np.linspace(1, 0, 21)) == pytest.approx(0.5)


def test_pointing_game_and_energy_on_a_hand_made_mask() -> None:
    mask = np.zeros((10, 12), dtype=bool)
    mask[0:3, 0:4] = True  # 12 pixels in the top-left corner
    inside = np.zeros((10, 12))
    inside[1, 2] = 1.0
    outside = np.zeros((10, 12))
    outside[8, 10] = 1.0  # 9.2 pixels from the mask's nearest pixel (2, 3)
    assert pointing_game(inside, mask) and not pointing_game(outside, mask)
    assert pointing_game(outside, mask, tolerance=10) and not pointing_game(outside, mask, tolerance=9)
    assert energy_inside(inside + outside, mask) == pytest.approx(0.5)
    assert energy_inside(np.zeros((10, 12)), mask) == pytest.approx(12 / 120)  # no mass: uniform
    central = np.zeros((10, 12), dtype=bool)
    central[3:7, 4:8] = True
    centre = centre_map((10, 12))
    assert pointing_game(centre, central) and not pointing_game(centre, mask)
    assert energy_inside(centre, central) > central.mean() > energy_inside(centre, mask) / 2
    plateau = np.zeros((10, 12))
    plateau[0:3, 0:5] = 1.0  # tied maxima, judged by their centroid (1, 2)
    assert pointing_game(plateau, mask)
    plateau[7:10, 7:12] = 1.0  # two plateaus: the centroid falls between them
    assert not pointing_game(plateau, mask)


def test_randomisation_check_is_a_rank_correlation() -> None:
    a = random_map((8, 8), seed=0)
    assert randomisation_check(a, a) == pytest.approx(1.0)
    assert randomisation_check(a, -a) == pytest.approx(-1.0)
    assert randomisation_check(a, a**3) == pytest.approx(1.0)  # monotone: same ranks
    assert randomisation_check(a, np.zeros((8, 8))) == 0.0


def test_randomised_copy_reinitialises_only_the_backbone(planted) -> None:
    model = planted.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    full = randomised_copy(model, seed=5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # original untouched
    assert all(torch.equal(full.head.state_dict()[k], v) for k, v in model.head.state_dict().items())
    convs = [(name, m.weight) for name, m in full.image_branch.named_modules() if isinstance(m, torch.nn.Conv2d)]
    original = dict(model.image_branch.named_modules())
    assert convs and all(not torch.equal(w, original[name].weight) for name, w in convs)
    steps = list(cascading_randomisation(model, seed=5))
    top = steps[0][1]
    assert steps[0][0] == 1 and len(steps) == len(
        [m for m in model.image_branch.model.children() if any(True for _ in m.parameters())]
    )
    new, old = top.image_branch.model, model.image_branch.model
    assert not torch.equal(new.layer4[0].conv1.weight, old.layer4[0].conv1.weight)  # top block re-initialised
    assert torch.equal(new.layer3[0].conv1.weight, old.layer3[0].conv1.weight)  # the rest kept


def test_cam_changes_when_the_backbone_is_randomised(planted) -> None:
    images, meta = planted.images[:2], planted.meta[:2]
    trained = GradCamExplainer(planted.model).explain(images, meta, [1, 1])
    again = GradCamExplainer(planted.model).explain(images, meta, [1, 1])
    randomised = randomised_cams(planted.model, images, meta, [1, 1], target_layer="layer3", seed=7)
    trained3 = GradCamExplainer(planted.model, target_layer="layer3").explain(images, meta, [1, 1])
    assert randomised.shape == trained.shape
    for i in range(2):
        assert randomisation_check(trained[i], again[i]) == pytest.approx(1.0)
        assert randomisation_check(trained3[i], randomised[i]) < 0.5
