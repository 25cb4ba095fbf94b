"""Faithfulness measures, baselines with paired verdicts and the sanity checks, on hand-made maps and
on a planted case (a trained model whose evidence is known)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from multimodal_lesion.errors import ConfigError
from multimodal_lesion.explain import (
    BoundMetadata,
    CamSetup,
    GradCamExplainer,
    baseline_maps,
    cascading_randomisation,
    centre_map,
    compare_to_baselines,
    curve_auc,
    energy_inside,
    faithfulness_report,
    fit_centre_sigma,
    map_similarity,
    paired_comparison,
    perturbation_curve,
    pointing_game,
    random_logit_check,
    random_map,
    randomisation_stages,
    road_scores,
    smooth_random_map,
)
from multimodal_lesion.explain.randomisation import activation_std, maps_and_activation_std

pytestmark = pytest.mark.usefixtures("single_thread")


def test_true_map_beats_the_baselines_on_the_planted_case(planted) -> None:
    truth = planted.mask.astype(float)
    priors = baseline_maps(np.stack([planted.mask] * 3), smooth_sigma=4)
    for i, image in enumerate(planted.images[:2]):
        predict = BoundMetadata(planted.model, planted.meta[i : i + 1])
        maps = {"cam": truth, **priors.maps(planted.size, seed=i)}
        report = faithfulness_report(predict, image, maps, 1, mask=planted.mask, baseline="zero", steps=10)
        assert report["cam"]["deletion_auc"] < report["centre"]["deletion_auc"] - 0.2
        assert report["cam"]["insertion_auc"] > report["centre"]["insertion_auc"] + 0.2
        assert report["cam"]["road"] > report["smooth_random"]["road"] + 0.2
        assert report["mean_mask"] == pytest.approx(report["cam"], abs=1e-4)  # every mask is the planted square
        assert report["cam"]["pointing_game"] == 1.0 and report["cam"]["energy_inside"] == 1.0
        assert report["centre"]["pointing_game"] == 0.0  # the planted square is not central


def test_cam_beats_the_centre_prior_on_the_planted_case(planted) -> None:
    cams = GradCamExplainer(planted.model).explain(planted.images[:2], planted.meta[:2], [1, 1])
    for i, (cam, image) in enumerate(zip(cams, planted.images[:2], strict=True)):
        predict = BoundMetadata(planted.model, planted.meta[i : i + 1])
        maps = {"cam": cam, "centre": centre_map(planted.size), "smooth_random": smooth_random_map(planted.size, 4, i)}
        report = faithfulness_report(predict, image, maps, 1, mask=planted.mask, road_percentiles=(), seed=1)
        assert report["cam"]["deletion_auc"] < report["centre"]["deletion_auc"]
        assert report["cam"]["energy_inside"] > report["centre"]["energy_inside"]
        assert "road" not in report["cam"]  # no percentiles, no ROAD


def test_deletion_fills_with_the_images_own_mean_colour(planted) -> None:
    """The docstring says the mean colour; the old fill was zeros (ImageNet's mean: a mid-grey)."""
    image, meta = planted.images[0] + 0.7, planted.meta[:1]  # an image whose mean is far from zero
    predict = BoundMetadata(planted.model.eval(), meta)
    mean_colour = image.mean(dim=(1, 2), keepdim=True).expand_as(image)
    with torch.no_grad():
        p_image = torch.softmax(predict(image[None]).double(), -1)[0, 1].item()
        p_mean = torch.softmax(predict(mean_colour[None]).double(), -1)[0, 1].item()
        p_zero = torch.softmax(predict(torch.zeros_like(image)[None]).double(), -1)[0, 1].item()
    assert abs(p_mean - p_zero) > 1e-4  # the two fills are distinguishable here
    sal = random_map(image.shape[-2:], seed=3)
    deletion = perturbation_curve(predict, image, sal, 1, mode="deletion", steps=10)
    insertion = perturbation_curve(predict, image, sal, 1, mode="insertion", steps=10)
    assert deletion.shape == insertion.shape == (11,)
    assert deletion[0] == pytest.approx(p_image, abs=1e-6) and insertion[-1] == pytest.approx(p_image, abs=1e-6)
    assert deletion[-1] == pytest.approx(p_mean, abs=1e-6)
    zero = perturbation_curve(predict, image, sal, 1, mode="deletion", steps=10, baseline="zero")
    assert zero[-1] == pytest.approx(p_zero, abs=1e-6)
    with pytest.raises(ConfigError, match="baseline"):
        perturbation_curve(predict, image, sal, 1, baseline="zeros")
    with pytest.raises(ConfigError, match="does not match"):
        perturbation_curve(predict, image, sal[:10], 1)


def test_road_prefers_the_true_map_and_is_seeded(planted) -> None:
    predict = BoundMetadata(planted.model, planted.meta[:1])
    maps = np.stack([planted.mask.astype(np.float32), smooth_random_map(planted.size, 4, 0).astype(np.float32)])
    first = road_scores(predict, planted.images[0], maps, 1, (20, 50, 80), seed=3)
    again = road_scores(predict, planted.images[0], maps, 1, (20, 50, 80), seed=3)
    np.testing.assert_array_equal(first, again)
    assert first[0] > first[1]
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    torch.manual_seed(3)  # the library's own metric, same noise: the same scores
    theirs = ROADCombined(percentiles=[20, 50, 80])(
        planted.images[0][None].expand(2, -1, -1, -1), maps, [ClassifierOutputSoftmaxTarget(1)] * 2, predict
    )
    np.testing.assert_allclose(first, theirs, atol=1e-5)


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
    plateau = np.zeros((10, 12))
    plateau[0:3, 0:5] = 1.0  # tied maxima, judged by their centroid (1, 2)
    assert pointing_game(plateau, mask)
    plateau[7:10, 7:12] = 1.0  # two plateaus: the centroid falls between them
    assert not pointing_game(plateau, mask)


def test_baselines_are_fitted_on_the_training_masks() -> None:
    h, w = 60, 80
    yy, xx = np.mgrid[:h, :w]
    small = ((yy - 30) / 8) ** 2 + ((xx - 40) / 10) ** 2 <= 1  # small central lesions
    large = ((yy - 30) / 26) ** 2 + ((xx - 40) / 35) ** 2 <= 1
    assert fit_centre_sigma(np.stack([small] * 4)) < fit_centre_sigma(np.stack([large] * 4))
    priors = baseline_maps(np.stack([small, large]), smooth_sigma=8)
    np.testing.assert_allclose(priors.mean_mask, (small.astype(float) + large) / 2)
    assert priors.n_masks == 2
    maps = priors.maps((h, w), seed=0)
    assert set(maps) == {"mean_mask", "centre", "smooth_random"}
    assert energy_inside(maps["centre"], large) > energy_inside(random_map((h, w)), large)
    rough, smooth = random_map((h, w), 0), maps["smooth_random"]
    assert np.abs(np.diff(smooth, axis=1)).mean() < 0.2 * np.abs(np.diff(rough, axis=1)).mean()
    assert set(baseline_maps(None, 8).maps((h, w), 0)) == {"centre", "smooth_random"}  # no masks, no mean mask
    with pytest.raises(ConfigError, match="masks"):
        fit_centre_sigma(np.zeros((0, h, w)))


def test_paired_comparison_gives_verdicts_with_a_bootstrap_ci() -> None:
    rng = np.random.default_rng(0)
    base = rng.random(40)
    better = paired_comparison("energy_inside", "centre", base + 0.2 + rng.normal(0, 0.05, 40), base)
    assert better.verdict == "better" and better.ci_low > 0 and better.diff == pytest.approx(0.2, abs=0.03)
    # deletion: lower is better, so a lower CAM AUC is a positive difference
    assert paired_comparison("deletion_auc", "centre", base - 0.2, base).verdict == "better"
    assert paired_comparison("deletion_auc", "centre", base + 0.2, base).verdict == "worse"
    tie = paired_comparison("insertion_auc", "centre", base + rng.normal(0, 0.1, 40), base)
    assert tie.verdict == "tie" and tie.ci_low < 0 < tie.ci_high
    assert paired_comparison("road", "centre", base, base).verdict == "tie"  # identical maps: no verdict either way
    assert paired_comparison("road", "centre", [0.1], [0.2]).verdict == "n/a"
    reports = [{"cam": {"road": 0.3}, "centre": {"road": 0.1}, "smooth_random": {"road": 0.0}} for _ in range(5)]
    rows = compare_to_baselines(reports)
    assert [(r.metric, r.baseline) for r in rows] == [("road", "centre"), ("road", "smooth_random")]


def test_map_similarity_never_passes_a_constant_or_dead_map() -> None:
    a = random_map((8, 8), seed=0)
    same = map_similarity(a, a)
    assert same.valid and same.spearman == pytest.approx(1.0) and same.ssim == pytest.approx(1.0)
    assert map_similarity(a, -a + 1).spearman == pytest.approx(-1.0)
    flat = map_similarity(a, np.zeros((8, 8)))
    assert not flat.valid and flat.reason == "constant map" and np.isnan(flat.spearman)
    dead = map_similarity(a, random_map((8, 8), seed=1), activation_ratio=1e-9)
    assert not dead.valid and dead.reason == "activations vanished"


def test_stages_run_from_the_head_down(planted) -> None:
    stages = [name for name, _ in randomisation_stages(planted.model)]
    assert stages == ["head", "layer4", "layer3", "layer2", "layer1", "bn1", "conv1"]


def test_cascading_randomisation_changes_the_map_and_leaves_the_model(planted) -> None:
    images, meta = planted.images[:3], planted.meta[:3]
    setup = CamSetup(target_layer="layer3")
    cams = setup.maps(planted.model, images, meta, [1, 1, 1])
    before = copy.deepcopy(planted.model.state_dict())
    stages = cascading_randomisation(planted.model, images, meta, [1, 1, 1], cams, setup, seed=7)
    assert all(torch.equal(v, planted.model.state_dict()[k]) for k, v in before.items())  # original untouched
    assert [s.stage for s in stages][:2] == ["head", "layer4"]
    bottom = stages[-1]
    assert bottom.n_valid == 3 and bottom.verdict == "changed" and bottom.spearman < 0.5


def test_a_dead_randomised_model_is_invalid_never_a_pass(planted) -> None:
    """The old check re-initialised the backbone and scored a constant map as Spearman 0, a pass."""
    images, meta = planted.images[:2], planted.meta[:2]
    setup = CamSetup()
    cams = setup.maps(planted.model, images, meta, [1, 1])

    def kill(module: torch.nn.Module) -> None:  # a randomised network whose activations vanish
        for p in module.parameters():
            torch.nn.init.zeros_(p)

    stages = cascading_randomisation(planted.model, images, meta, [1, 1], cams, setup, randomiser=kill)
    assert stages and all(s.verdict == "invalid" for s in stages)
    assert all(not c.valid for s in stages for c in s.cases)
    assert "constant map" in stages[0].reasons() and "activations vanished" in stages[-1].reasons()


def test_random_logit_check_explains_another_class(small_model) -> None:
    model = small_model("gated", meta_dim=6)
    g = torch.Generator().manual_seed(1)
    images, meta = torch.randn(3, 3, 64, 48, generator=g), torch.randn(3, 6, generator=g)
    setup = CamSetup()
    cams = setup.maps(model, images, meta, [3, 4, 6])  # classes whose maps are not all negative here
    check = random_logit_check(model, images, meta, [3, 4, 6], cams, setup, num_classes=7, seed=0)
    assert check.stage == "random logit" and len(check.cases) == 3
    assert check.n_valid == 3 and all(c.spearman < 0.999 for c in check.cases)
    dead = random_logit_check(model, images, meta, [1, 2, 3], cams, setup, num_classes=7, seed=0)
    assert dead.verdict == "invalid"  # the other classes' maps are constant (all negative, cut by ReLU) here


@pytest.mark.parametrize("flip_average", [False, True])
def test_the_activation_check_reads_the_cam_pass(planted, flip_average: bool) -> None:
    """Each randomisation stage reuses its CAM pass's activations: the same std as a pass of its own."""
    images, meta = planted.images[:3], planted.meta[:3]
    setup = CamSetup(target_layer="layer3", flip_average=flip_average)
    maps, std = maps_and_activation_std(setup, planted.model, "layer3", images, meta, [1, 1, 1])
    assert std == pytest.approx(
        activation_std(planted.model, planted.model.get_submodule("image_branch.model.layer3"), images), rel=1e-6
    )
    assert np.array_equal(maps, setup.maps(planted.model, images, meta, [1, 1, 1]))


def test_road_imputation_is_pytorch_grad_cams(planted) -> None:
    """The vectorised, cached imputer gives NoisyLinearImputer's images (same system, same seeded noise)."""
    from pytorch_grad_cam.metrics.perturbation_confidence import RemoveLeastRelevantFirst, RemoveMostRelevantFirst
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    from multimodal_lesion.explain.faithfulness import RoadImputer, road_images

    image = planted.images[0]
    maps = np.stack([centre_map(planted.size), smooth_random_map(planted.size, 4, 1), planted.mask.astype(float)])
    torch.manual_seed(3)
    original = torch.stack(
        [
            order(p, NoisyLinearImputer())(image, torch.from_numpy(m.astype(np.float32)))
            for order in (RemoveLeastRelevantFirst, RemoveMostRelevantFirst)
            for p in (20, 50, 80)
            for m in maps
        ]
    )
    imputer = RoadImputer()
    torch.manual_seed(11)
    state = torch.get_rng_state()
    for _ in range(2):  # the second time from the cached factors
        torch.testing.assert_close(road_images(image, maps, (20, 50, 80), seed=3, imputer=imputer), original)
    assert 0 < len(imputer._systems) <= 18  # one system per distinct removal mask
    assert torch.equal(torch.get_rng_state(), state)  # its own generator: the global one is not touched (threads)
    torch.testing.assert_close(road_images(image, maps, (20, 50, 80), seed=3, imputer=NoisyLinearImputer()), original)


def test_the_chunks_of_a_report_share_the_roads_factors(planted) -> None:
    """One imputer passed to every chunk's call: a mask every case shares (the centre baseline's) is
    factorised once for the report, and the measures equal those of a fresh imputer per call."""
    from multimodal_lesion.explain.faithfulness import (
        CurveSettings,
        FaithfulnessCase,
        RoadImputer,
        faithfulness_reports,
    )

    model = planted.model.eval()
    maps = {"cam": planted.mask.astype(float), "centre": centre_map(planted.size)}
    cases = [FaithfulnessCase(planted.images[i], planted.meta[i], 1, maps) for i in range(2)]
    settings = CurveSettings(steps=4, road_percentiles=(20, 80))

    def predict(images: torch.Tensor, meta: torch.Tensor | None) -> torch.Tensor:
        return BoundMetadata(model, meta)(images)

    shared = RoadImputer()
    first = faithfulness_reports(predict, cases[:1], settings, imputer=shared)
    built = set(shared._systems)
    second = faithfulness_reports(predict, cases[1:], settings, imputer=shared)
    assert set(shared._systems) == built  # the second chunk's masks (the same two maps) all came from the cache
    fresh = [faithfulness_reports(predict, [case], settings)[0] for case in cases]
    for got, want in zip([*first, *second], fresh, strict=True):
        for name in maps:
            assert got[name] == pytest.approx(want[name], abs=1e-6)
