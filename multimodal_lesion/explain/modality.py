"""Image versus metadata: exact Shapley values over the players {image, age, sex, localization}.

"How much of this prediction came from the image, and from each patient feature": the game is the
one of :mod:`.shap_groups` with the image as a fourth player (16 coalitions). The image enters as its
*image state* (``model.image_state``: the pooled embedding of a late model, the maps at the fusion
point of a model that fuses on the maps). An absent image takes the background states: for a late
model the mean training embedding, or one embedding per background case paired with that case's
metadata; for a map model the pipeline passes one map per background case, paired with that case's
metadata (a mean of maps is no image the tail ever saw, so it is not offered as a default). Absent
patient features take the background metadata. Each coalition runs the model's metadata-conditioned
part again (``model.from_image_state``), so the split stays exact when the metadata changes the maps. The
explained output is the same softmax probability (or log-odds) as the grouped SHAP values, with the
same bootstrap estimate of the background's sampling error. Integrated Gradients
(captum) on both inputs is offered as a gradient-based second opinion.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import shap
import torch
from captum.attr import IntegratedGradients
from torch import Tensor

from ..errors import ConfigError
from ..models.fusion import LesionModel
from .gradcam import preserved_state, state_logits
from .shap_groups import DEFAULT_PERMUTATIONS, Scale, as_input_tensor, check_groups, group_columns, grouped_shapley

IMAGE_PLAYER = "image"


@dataclass(frozen=True)
class ModalityAttribution:
    """Shapley values of the image and each patient feature for B cases.

    ``base_values + values.sum(1) == outputs`` (the explained probability of class ``targets``, or its
    log-odds); ``values_se`` is each value's background sampling error (bootstrap standard deviation).
    """

    players: list[str]  # ["image", *groups]
    values: np.ndarray  # (B, P)
    base_values: np.ndarray  # (B,) mean output over the background
    outputs: np.ndarray  # (B,) explained output of each case
    targets: np.ndarray  # (B,) explained class index
    values_se: np.ndarray | None = None  # (B, P) bootstrap standard deviation over background redraws
    scale: str = "probability"

    def to_explanation(self) -> shap.Explanation:
        """The same numbers as a ``shap.Explanation`` (for ``shap.plots.bar`` / ``waterfall``)."""
        return shap.Explanation(values=self.values, base_values=self.base_values, feature_names=self.players)


def _background(
    model: LesionModel, states: Tensor | None, background_states: Tensor | None, n_meta: int
) -> Tensor | None:
    """Checked background image states: None for metadata-only models, else 1 or ``n_meta`` rows."""
    if not model.uses_image:
        return None
    if states is None or background_states is None:
        raise ConfigError("this model looks at the image: pass the image states and background states")
    if background_states.ndim == states.ndim - 1:
        background_states = background_states[None]
    if background_states.shape[1:] != states.shape[1:]:
        raise ConfigError(
            f"background states of shape {tuple(background_states.shape[1:])} do not match the cases' "
            f"{tuple(states.shape[1:])}"
        )
    if len(background_states) not in (1, n_meta):
        raise ConfigError(
            f"background_states has {len(background_states)} rows; "
            f"need 1 (the mean) or one per background metadata row ({n_meta})"
        )
    return background_states


def modality_shapley(
    model: LesionModel,
    states: np.ndarray | Tensor | None,
    meta: np.ndarray | Tensor,
    background_states: np.ndarray | Tensor | None,
    background_meta: np.ndarray | Tensor,
    groups: Mapping[str, Sequence[int]],
    targets: Sequence[int] | None = None,
    *,
    temperature: float = 1.0,
    scale: Scale = "probability",
    resamples: int = 0,
    seed: int = 0,
    permutations: int = DEFAULT_PERMUTATIONS,
) -> ModalityAttribution:
    """Shapley values over {image, *groups} of the target-class probability: exact (2^(1+G) coalitions)
    up to ``MAX_EXACT_PLAYERS`` players, sampled over ``permutations`` orders above (see :mod:`.shap_groups`).

    Args:
        model: the fused model; ``from_image_state`` on the cases' image states is what is explained.
        states: image states of the cases (``model.image_state``: embeddings (B, F), or maps (B, C, h, w)
            of a model that fuses on the maps); None for metadata-only models.
        meta: encoded metadata (B, D).
        background_states: one state (the mean training embedding) or M states paired with
            ``background_meta`` (for a map model: the background cases' maps).
        background_meta: encoded training metadata (M, D).
        groups: patient feature -> encoded columns (``MetadataEncoder.feature_groups_``).
        targets: explained class per case; None = the predicted class.
        temperature: logits are divided by it before the softmax.
        scale: ``probability`` or ``log_odds``.
        resamples: bootstrap redraws of the background rows for ``values_se`` (0 = none).
        seed: seed of the redraws and of the sampled orders.
        permutations: sampled orders above ``MAX_EXACT_PLAYERS`` players (their error joins ``values_se``).
    """
    meta_t, bg_meta = as_input_tensor(meta, model), as_input_tensor(background_meta, model)
    groups = check_groups(groups, bg_meta.shape[1])
    emb_t = as_input_tensor(states, model) if model.uses_image else None
    bg_emb = _background(model, emb_t, as_input_tensor(background_states, model), len(bg_meta))
    columns = group_columns(groups, bg_meta.shape[1])
    res = grouped_shapley(  # player 0 = image
        model,
        emb_t,
        meta_t,
        bg_emb,
        bg_meta,
        1 + len(groups),
        lambda masks: (masks[:, 0], masks[:, 1:] @ columns),
        targets,
        temperature,
        scale=scale,
        resamples=resamples,
        seed=seed,
        permutations=permutations,
    )
    return ModalityAttribution(
        players=[IMAGE_PLAYER, *groups],
        values=res["values"],
        base_values=res["base_values"],
        outputs=res["outputs"],
        targets=res["targets"],
        values_se=res["values_se"],
        scale=scale,
    )


@dataclass(frozen=True)
class GradientAttribution:
    """Integrated Gradients of the target-class probability w.r.t. the embedding and the metadata.

    ``values`` sums the attributions per player (image, then each group); ``delta`` is captum's
    completeness error (sum of attributions minus the output change from the baseline).
    """

    players: list[str]
    values: np.ndarray  # (B, P)
    embedding: np.ndarray | None  # (B, F) per-dimension attributions of the image state ((B, C, h, w): maps)
    meta: np.ndarray | None  # (B, D)
    delta: np.ndarray  # (B,)


def _ig_inputs(
    model: LesionModel,
    embedding: Tensor | None,
    meta: Tensor | None,
    baseline_embedding: Tensor | None,
    baseline_meta: Tensor | None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """(input, baseline) per input the model uses; baselines default to zeros."""
    pairs = {
        "embedding": (model.uses_image, embedding, baseline_embedding),
        "meta": (model.uses_meta, meta, baseline_meta),
    }
    out = {}
    for name, (used, x, base) in pairs.items():
        if not used:
            continue
        if x is None:
            raise ConfigError(f"this model uses the {name}: pass it")
        out[name] = (x, torch.zeros_like(x) if base is None else base.reshape(-1, *x.shape[1:]).expand_as(x))
    return out


def integrated_gradients(
    model: LesionModel,
    embedding: np.ndarray | Tensor | None,
    meta: np.ndarray | Tensor | None,
    target: Sequence[int] | int,
    *,
    baseline_embedding: np.ndarray | Tensor | None = None,
    baseline_meta: np.ndarray | Tensor | None = None,
    groups: Mapping[str, Sequence[int]] | None = None,
    n_steps: int = 64,
    temperature: float = 1.0,
) -> GradientAttribution:
    """captum Integrated Gradients on both inputs of ``from_image_state`` (the image state and the
    metadata), summed per player (image, each group or "meta").

    A second opinion to :func:`modality_shapley`: baselines are single points (pass the mean training
    embedding and metadata; zeros by default), so the values sum to ``f(x) - f(baseline)``.
    """
    inputs = _ig_inputs(
        model,
        as_input_tensor(embedding, model),
        as_input_tensor(meta, model),
        as_input_tensor(baseline_embedding, model),
        as_input_tensor(baseline_meta, model),
    )
    names = list(inputs)

    def forward(*tensors: Tensor) -> Tensor:
        given = dict(zip(names, tensors, strict=True))
        logits = state_logits(model, given.get("embedding"), given.get("meta"))
        return torch.softmax(logits / temperature, dim=-1)

    n = len(next(iter(inputs.values()))[0])
    target_list = [int(target)] * n if isinstance(target, (int, np.integer)) else [int(t) for t in target]
    with preserved_state(model):
        model.eval()
        attrs, delta = IntegratedGradients(forward).attribute(
            tuple(x for x, _ in inputs.values()),
            baselines=tuple(b for _, b in inputs.values()),
            target=target_list,
            n_steps=n_steps,
            return_convergence_delta=True,
        )
    found = {k: a.detach().double().cpu().numpy() for k, a in zip(names, attrs, strict=True)}
    players, values = _ig_players(found, groups, n)
    return GradientAttribution(
        players=players,
        values=values,
        embedding=found.get("embedding"),
        meta=found.get("meta"),
        delta=delta.detach().double().cpu().numpy(),
    )


def _ig_players(
    found: dict[str, np.ndarray], groups: Mapping[str, Sequence[int]] | None, n: int
) -> tuple[list[str], np.ndarray]:
    """Per-player sums: image = all embedding dimensions; each group (or all of "meta") its columns."""
    cols: dict[str, tuple[str, Sequence[int] | slice]] = {IMAGE_PLAYER: ("embedding", slice(None))}
    cols.update({g: ("meta", c) for g, c in groups.items()} if groups else {"meta": ("meta", slice(None))})
    flat = {k: v.reshape(n, -1) for k, v in found.items()}  # a map model's state is (B, C, h, w)
    values = [flat[src][:, idx].sum(1) if src in flat else np.zeros(n) for src, idx in cols.values()]
    return list(cols), np.stack(values, axis=1)


__all__ = [
    "IMAGE_PLAYER",
    "GradientAttribution",
    "ModalityAttribution",
    "integrated_gradients",
    "modality_shapley",
]
