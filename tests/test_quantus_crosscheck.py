"""Our faithfulness measures against Quantus (PyPI) on the same maps: agreement, or the documented reason.

- Relevance mass accuracy = our ``energy_inside`` on non-negative maps: equal.
- Pointing game: equal where the maximum is unique. On a plateau of tied maxima Quantus counts a hit
  when *any* tied pixel is inside the mask; ours judges the plateau by its centroid (so a flat map
  points at the centre, like the centre prior). Shown below on a two-plateau map.
- Model-parameter randomisation (MPRT): given Quantus's own randomised models, our Spearman equals
  Quantus's for every layer and case with a non-constant map; where a randomised map is constant
  Quantus reports NaN and we report the case invalid. The randomisation itself differs on purpose:
  Quantus resets every module with ``reset_parameters`` in reverse *definition* order (for our
  models the metadata branch first and the fusion head last, BatchNorm reset to the identity),
  while ``cascading_randomisation`` re-draws stage by stage from the head down in the order the
  data flows (Adebayo et al.'s cascade). And Quantus stops (an AssertionError) at the first
  randomised model whose maps are all zero (a dead network), where we report those cases invalid and
  go on down the cascade.
"""

from __future__ import annotations

import numpy as np
import pytest
import quantus
import torch

from multimodal_lesion.explain import BoundMetadata, GradCamExplainer, energy_inside, map_similarity, pointing_game

pytestmark = pytest.mark.usefixtures("single_thread")


def _masks_and_maps(n: int = 6, shape: tuple[int, int] = (24, 32)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    masks = np.stack(
        [((yy - rng.integers(6, 18)) / 6) ** 2 + ((xx - rng.integers(8, 24)) / 8) ** 2 <= 1 for _ in range(n)]
    )
    maps = rng.random((n, *shape))  # continuous: a unique maximum
    maps[: n // 2] += 2 * masks[: n // 2]  # half the maps point into their lesion
    return masks, maps


def _quantus(metric: quantus.Metric, maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    n = len(maps)
    x = np.zeros((n, 1, *maps.shape[1:]), dtype=np.float32)
    return np.asarray(
        metric(model=None, x_batch=x, y_batch=np.zeros(n, dtype=int), a_batch=maps[:, None], s_batch=masks[:, None]),
        dtype=float,
    )


def test_relevance_mass_accuracy_is_our_energy_inside() -> None:
    masks, maps = _masks_and_maps()
    theirs = _quantus(quantus.RelevanceMassAccuracy(abs=False, normalise=False, disable_warnings=True), maps, masks)
    ours = [energy_inside(a, m) for a, m in zip(maps, masks, strict=True)]
    np.testing.assert_allclose(theirs, ours, atol=1e-6)


def test_pointing_game_agrees_where_the_maximum_is_unique() -> None:
    masks, maps = _masks_and_maps()
    theirs = _quantus(quantus.PointingGame(abs=False, normalise=False, disable_warnings=True), maps, masks)
    ours = [float(pointing_game(a, m)) for a, m in zip(maps, masks, strict=True)]
    np.testing.assert_array_equal(theirs, ours)
    assert 0 < sum(ours) < len(ours)  # both outcomes occur


def test_pointing_game_differs_on_plateaus_by_design() -> None:
    mask = np.zeros((10, 12), dtype=bool)
    mask[0:3, 0:4] = True
    plateau = np.zeros((10, 12))
    plateau[0:3, 0:5] = 1.0
    plateau[7:10, 7:12] = 1.0  # two tied plateaus, one touching the lesion
    theirs = _quantus(
        quantus.PointingGame(abs=False, normalise=False, disable_warnings=True), plateau[None], mask[None]
    )
    assert theirs[0] == 1.0  # any tied maximum inside is a hit
    assert not pointing_game(plateau, mask)  # the plateaus' centroid falls between them


def test_mprt_spearman_agrees_given_the_same_randomised_models(planted) -> None:
    images, meta = planted.images[:2], planted.meta[:1]
    wrapper = BoundMetadata(planted.model, meta)
    seen: list[np.ndarray] = []

    def explain(model, inputs, targets, **kwargs) -> np.ndarray:
        maps = GradCamExplainer(model.model, target_layer="layer3").explain(
            torch.as_tensor(inputs), model.meta.expand(len(inputs), -1), [int(t) for t in targets]
        )
        seen.append(maps)
        return maps[:, None]

    metric = quantus.MPRT(
        similarity_func=quantus.similarity_func.correlation_spearman,
        layer_order="top_down",
        abs=False,
        normalise=False,
        disable_warnings=True,
    )
    x, y = images.numpy(), np.ones(2, dtype=int)
    original = explain(wrapper, x, y)[:, 0]
    try:
        metric(model=wrapper, x_batch=x, y_batch=y, a_batch=original[:, None], explain_func=explain, device="cpu")
    except AssertionError as exc:  # Quantus refuses a dead layer's all-zero maps; we call them invalid
        assert "equal to zero" in str(exc)
        assert not np.any(seen[-1]) and not any(
            map_similarity(o, m).valid for o, m in zip(original, seen[-1], strict=True)
        )
    scores = {k: v for k, v in metric.evaluation_scores.items() if k != "original" and len(v) == 2}
    randomised = seen[2:]  # seen[0]: our call, seen[1]: Quantus's original explanation
    assert len(scores) >= 5
    checked = 0
    for (layer, values), maps in zip(scores.items(), randomised, strict=False):
        for i in range(2):
            ours = map_similarity(original[i], maps[i])
            if ours.valid:
                assert values[i] == pytest.approx(ours.spearman, abs=1e-6), layer
                checked += 1
            else:
                assert np.isnan(values[i]), layer  # a constant map: Quantus NaN, ours invalid
    assert checked >= 5
    assert next(iter(scores)).startswith("model.meta_branch")  # reverse definition order, not the head first
