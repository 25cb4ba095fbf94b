"""Grouped SHAP values of the patient features (any number of them), image held fixed.

Each patient feature is one player: its encoded columns (e.g. every ``localization=...`` one-hot) move
together. Up to :data:`MAX_EXACT_PLAYERS` players all 2^n coalitions are evaluated, so the values are
exact Shapley values of the interventional game ``v(S) = mean_m f(state, meta_S ∪ background_m)``, where
``f`` is the softmax probability of the explained class from ``model.from_image_state`` on the case's
image state (``model.image_state``, computed once per case: the cached embedding of a late model, the
maps at the fusion point of a map model; the backbone before it never runs again), or its log-odds
``log(p / (1 - p))`` of the background-averaged probability with ``scale="log_odds"`` (shap's logit
link). Every coalition, background row and case goes through the model's metadata-conditioned part in a
few batched calls: for a late model that is the head; for a model that fuses on the maps
(``model.fuses_on_maps``) it is the fused tail of the backbone too, since a coalition without a feature
changes the image path as well. The coalition machinery here is shared with :mod:`.modality`.

The values are exact for the background drawn; the background itself is a sample, so each value
comes with its sampling error: the standard deviation of the value over ``resamples`` bootstrap
redraws of the background's rows (each coalition's per-row outputs are kept, so a redraw costs a
weighted mean, not another forward pass).

Above :data:`MAX_EXACT_PLAYERS` players (PAD-UFES-20 has 21 features; 2^21 coalitions would not fit)
the values are estimated by permutation sampling (Castro et al. 2009; Strumbelj & Kononenko 2014):
``permutations`` random orders of the players, each in an antithetic pair with its reverse (Mitchell
et al. 2022), and for each order the marginal contribution of every player as it joins the players
before it. Every order's contributions sum to ``v(all) - v(none)``, so the estimates keep SHAP's
additivity exactly; their standard error is the standard deviation of the antithetic pair means over
the square root of the number of pairs, reported per value (``sampling_se``) and added in quadrature
to the background's error in ``values_se``. It costs ``permutations * (n + 1)`` coalitions instead of
``2^n``: with n = 21 and 64 orders, 1,408 instead of 2,097,152.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from math import factorial
from types import MappingProxyType
from typing import Literal, overload

import numpy as np
import pandas as pd
import shap
import torch
from torch import Tensor

from ..errors import ConfigError
from ..models.fusion import LesionModel
from .gradcam import preserved_state, state_logits

MAX_ROWS_PER_CALL = 32768  # (case, coalition, background row) triples per from_image_state call
MAX_STATE_VALUES_PER_CALL = 2**24  # image-state values per call (a map model's maps are big: fewer rows)
#: Most players whose 2^n coalitions are all evaluated; above it the values are sampled (module docstring).
MAX_EXACT_PLAYERS = 10
#: Random orders of the players (in antithetic pairs) behind each sampled value.
DEFAULT_PERMUTATIONS = 64
Scale = Literal["probability", "log_odds"]
LOGIT_EPS = 1e-6  # probabilities are clipped to [eps, 1 - eps] before the log-odds


def _log_odds(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, LOGIT_EPS, 1 - LOGIT_EPS)
    return np.log(p / (1 - p))


#: How the background-averaged probability of a coalition becomes the explained value.
LINKS = MappingProxyType({"probability": lambda p: p, "log_odds": _log_odds})


def bootstrap_weights(n_rows: int, resamples: int, seed: int) -> np.ndarray:
    """(1 + resamples, n_rows) row weights summing to 1: the background itself, then bootstrap redraws."""
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n_rows, np.full(n_rows, 1 / n_rows), size=resamples) / n_rows
    return np.vstack([np.full((1, n_rows), 1 / n_rows), draws])


def coalition_masks(n_players: int) -> np.ndarray:
    """All 2^n coalitions as a bool matrix (2^n, n); row k holds the bits of k (row 0 = empty)."""
    k = np.arange(2**n_players)[:, None]
    return (k >> np.arange(n_players)[None, :]) & 1 == 1


def shapley_values(v: np.ndarray, n_players: int) -> np.ndarray:
    """Exact Shapley values (B, n) from coalition values v (B, 2^n) indexed as in :func:`coalition_masks`.

    ``phi_i = sum_{S ∌ i} |S|!(n-|S|-1)!/n! (v(S ∪ i) - v(S))``, as marginal differences so a player
    that never changes the output gets exactly 0.
    """
    k = np.arange(v.shape[1])
    size = coalition_masks(n_players).sum(1)
    weight = np.array([factorial(s) * factorial(n_players - s - 1) / factorial(n_players) for s in range(n_players)])
    phi = np.empty((v.shape[0], n_players))
    for i in range(n_players):
        without = k[(k >> i) & 1 == 0]
        phi[:, i] = (v[:, without | (1 << i)] - v[:, without]) @ weight[size[without]]
    return phi


def permutation_orders(n_players: int, permutations: int, seed: int) -> np.ndarray:
    """(P, n) player orders: P/2 random permutations, each followed by its reverse (antithetic pairs)."""
    if permutations < 2 or permutations % 2:
        raise ConfigError(f"permutations must be an even number >= 2, got {permutations}")
    rng = np.random.default_rng(seed)
    half = np.stack([rng.permutation(n_players) for _ in range(permutations // 2)])
    return np.stack([half, half[:, ::-1]], axis=1).reshape(permutations, n_players)


def order_masks(orders: np.ndarray) -> np.ndarray:
    """The coalitions along each order (P * (n + 1), n): none, then each player joining in turn."""
    p, n = orders.shape
    rank = np.argsort(orders, axis=1)  # rank[k, i]: where player i joins order k
    return (rank[:, None, :] < np.arange(n + 1)[None, :, None]).reshape(p * (n + 1), n)


def sampled_shapley_values(v: np.ndarray, orders: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shapley estimates (B, n) and their standard errors from coalition values v (B, P * (n + 1)).

    ``v`` is indexed as :func:`order_masks`; each order gives every player's marginal contribution.
    """
    p, n = orders.shape
    steps = v.reshape(v.shape[0], p, n + 1)
    gains = np.diff(steps, axis=2)  # (B, P, n): the gain of the player joining at each position
    phi = np.empty_like(gains)
    np.put_along_axis(phi, np.broadcast_to(orders[None], gains.shape), gains, axis=2)
    pairs = phi.reshape(v.shape[0], p // 2, 2, n).mean(axis=2)  # antithetic pair means: the independent draws
    se = pairs.std(axis=1, ddof=1) / np.sqrt(p // 2) if p > 2 else np.full((v.shape[0], n), np.nan)
    return phi.mean(axis=1), se


def check_groups(groups: Mapping[str, Sequence[int]], meta_dim: int) -> dict[str, list[int]]:
    """Groups as lists of column indices; every metadata column must belong to exactly one group."""
    owner: dict[int, str] = {}
    for name, cols in groups.items():
        for c in cols:
            if not 0 <= int(c) < meta_dim:
                raise ConfigError(f"feature group '{name}': column {c} outside 0..{meta_dim - 1}")
            if int(c) in owner:
                raise ConfigError(f"metadata column {c} is in groups '{owner[int(c)]}' and '{name}'")
            owner[int(c)] = name
    missing = sorted(set(range(meta_dim)) - owner.keys())
    if missing:
        raise ConfigError(f"metadata column {missing[0]} belongs to no feature group")
    return {name: [int(c) for c in cols] for name, cols in groups.items()}


def group_columns(groups: Mapping[str, Sequence[int]], meta_dim: int) -> np.ndarray:
    """Bool matrix (G, D): which metadata columns each group owns."""
    out = np.zeros((len(groups), meta_dim), dtype=bool)
    for g, cols in enumerate(groups.values()):
        out[g, list(cols)] = True
    return out


@overload
def as_input_tensor(x: np.ndarray | Tensor, model: torch.nn.Module) -> Tensor: ...


@overload
def as_input_tensor(x: np.ndarray | Tensor | None, model: torch.nn.Module) -> Tensor | None: ...


def as_input_tensor(x: np.ndarray | Tensor | None, model: torch.nn.Module) -> Tensor | None:
    """``x`` as a tensor with the model's device and floating dtype (None stays None)."""
    if x is None:
        return None
    param = next(model.parameters())
    return torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).to(param.device, param.dtype)


def _rows(
    own: Tensor | None, background: Tensor | None, present: Tensor, case: Tensor, coal: Tensor, bg: Tensor
) -> Tensor | None:
    """Inputs of the flat (case, coalition, background row) triples ``(case, coal, bg)``: the case's own
    where ``present[coal]`` says so, else background row ``bg``.

    ``own`` (B, *S), ``background`` (M, *S) or None (own always), ``present`` (K,) or (K, W) bool. A state
    (the image embedding, or a map model's maps) is one block; metadata columns mix one by one.
    """
    if own is None:
        return None
    if background is None:
        return own[case]
    keep = present[coal]
    keep = keep.reshape(*keep.shape, *([1] * (own.ndim - keep.ndim)))
    return torch.where(keep, own[case], background[bg])


def rows_per_call(state: Tensor | None) -> int:
    """Triples per ``from_image_state`` call: :data:`MAX_ROWS_PER_CALL`, fewer for big states (maps)."""
    per_row = 1 if state is None else max(1, state[0].numel())
    return max(1, min(MAX_ROWS_PER_CALL, MAX_STATE_VALUES_PER_CALL // per_row))


def _given(first: Tensor | None, second: Tensor | None) -> Tensor:
    """``first``, or ``second`` when it is None: every model reads the image, the metadata or both."""
    if first is not None:
        return first
    if second is None:
        raise ConfigError("neither image states nor metadata given")
    return second


def coalition_probabilities(
    model: LesionModel,
    states: Tensor | None,
    meta: Tensor | None,
    background_states: Tensor | None,
    background_meta: Tensor | None,
    state_present: Tensor,
    meta_present: Tensor,
    temperature: float = 1.0,
    weights: Tensor | None = None,
) -> Tensor:
    """Class probabilities (R, B, K, C) of every coalition, averaged over the paired background rows
    with each of the R rows of ``weights`` (R, M); None = the plain mean (R = 1).

    ``states`` are the cases' image states (``model.image_state``: the embedding of a late model, the
    maps of a map model). ``state_present`` (K,) and ``meta_present`` (K, D) say which inputs come from
    the case; the rest comes from background row m (states: M rows or 1 row shared). Every
    (case, coalition, background row) is one row of ``model.from_image_state``, so a map model's
    metadata-conditioned part runs again for each coalition: exact for both kinds. A late model whose
    head reads the image through a linear layer (``model.image_term``) has its states reduced to that
    term first, so each row moves the narrow term instead of the state. Inputs the model ignores may be None.
    """
    n_bg = len(_given(background_meta, background_states))
    term = model.image_term(states) if states is not None else None
    if term is not None:
        states = term
        background_states = None if background_states is None else model.image_term(background_states)

    def forward(state: Tensor | None, met: Tensor | None) -> Tensor:
        if term is not None and state is not None:
            return model.from_image_term(state, met)
        return state_logits(model, state, met)

    if background_states is not None and len(background_states) == 1:
        background_states = background_states.expand(n_bg, *background_states.shape[1:])
    n_cases, n_coal = len(_given(states, meta)), len(meta_present)
    if weights is None:
        weights = torch.full((1, n_bg), 1 / n_bg, device=meta_present.device)
    flat = torch.arange(n_cases * n_coal * n_bg, device=meta_present.device)
    step = rows_per_call(states)
    probs = []
    for part in flat.split(step):
        case, coal, bg = part // (n_coal * n_bg), (part // n_bg) % n_coal, part % n_bg
        state = _rows(states, background_states, state_present, case, coal, bg)
        met = _rows(meta, background_meta, meta_present, case, coal, bg)
        logits = forward(state, met)
        probs.append(torch.softmax(logits / temperature, dim=-1).double())
    per_row = torch.cat(probs).reshape(n_cases, n_coal, n_bg, -1)
    return torch.einsum("bkmc,rm->rbkc", per_row, weights.to(per_row))


def _pick(probs: Tensor, targets: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray]:
    """Values (R, B, K) of the explained class and the classes; None = the full coalition's argmax."""
    probs_np = probs.double().cpu().numpy()
    n, c = probs_np.shape[1], probs_np.shape[-1]
    if targets is None:
        chosen = probs_np[0, :, -1].argmax(-1)
    else:
        chosen = np.asarray(targets, dtype=np.int64).reshape(-1)
        if len(chosen) != n:
            raise ConfigError(f"{len(chosen)} targets given for {n} cases")
        if ((chosen < 0) | (chosen >= c)).any():
            raise ConfigError(f"target class {chosen[(chosen < 0) | (chosen >= c)][0]} out of range 0..{c - 1}")
    return probs_np[:, np.arange(n), :, chosen].transpose(1, 0, 2), chosen


def exact_shapley(
    model: LesionModel,
    states: Tensor | None,
    meta: Tensor | None,
    background_states: Tensor | None,
    background_meta: Tensor | None,
    state_present: np.ndarray,
    meta_present: np.ndarray,
    masks: np.ndarray,
    targets: Sequence[int] | None,
    temperature: float = 1.0,
    *,
    scale: Scale = "probability",
    resamples: int = 0,
    seed: int = 0,
    orders: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Shapley values over the players of ``masks`` (K, n): values, base, output, targets, and the
    background's sampling error of each value and base (``values_se``, ``base_se``: the standard
    deviation over ``resamples`` bootstrap redraws of the background rows; zeros when 0).

    ``masks`` are every coalition (:func:`coalition_masks`: exact values) or, with ``orders``, the
    coalitions along sampled orders (:func:`order_masks`: estimates whose standard error is
    ``sampling_se``, added in quadrature to ``values_se``).

    The model runs in eval mode without gradients; its flags are restored afterwards.
    """
    if scale not in LINKS:
        raise ConfigError(f"explain.shap_scale: unknown scale '{scale}' (valid: {', '.join(LINKS)})")
    device = next(model.parameters()).device
    n_bg = len(_given(background_meta, background_states))
    weights = torch.as_tensor(bootstrap_weights(n_bg, resamples, seed), device=device)
    with preserved_state(model), torch.no_grad():
        model.eval()
        probs = coalition_probabilities(
            model,
            states,
            meta,
            background_states,
            background_meta,
            torch.as_tensor(state_present, device=device),
            torch.as_tensor(meta_present, device=device),
            temperature,
            weights,
        )
    v, chosen = _pick(probs, targets)  # (R, B, K)
    v = LINKS[scale](v)
    spread = (lambda x: x[1:].std(0, ddof=1)) if resamples > 1 else (lambda x: np.zeros_like(x[0]))
    if orders is None:
        phi = np.stack([shapley_values(v_r, masks.shape[1]) for v_r in v])
        sampling = np.zeros_like(phi[0])
    else:
        phi = np.stack([sampled_shapley_values(v_r, orders)[0] for v_r in v])
        sampling = sampled_shapley_values(v[0], orders)[1]
    return {
        "values": phi[0],
        "base_values": v[0, :, 0],
        "outputs": v[0, :, -1],
        "targets": chosen,
        "values_se": np.sqrt(spread(phi) ** 2 + sampling**2),
        "sampling_se": sampling,
        "base_se": spread(v[:, :, 0]),
        "exact": orders is None,
    }


def grouped_shapley(
    model: LesionModel,
    states: Tensor | None,
    meta: Tensor | None,
    background_states: Tensor | None,
    background_meta: Tensor | None,
    n_players: int,
    present: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    targets: Sequence[int] | None,
    temperature: float = 1.0,
    *,
    scale: Scale = "probability",
    resamples: int = 0,
    seed: int = 0,
    permutations: int = DEFAULT_PERMUTATIONS,
) -> dict[str, np.ndarray]:
    """Shapley values over ``n_players``: exact up to :data:`MAX_EXACT_PLAYERS`, sampled above (module docstring).

    ``present(masks)`` turns coalitions (K, n) into (image state present (K,), metadata columns present (K, D)).
    """
    orders = permutation_orders(n_players, permutations, seed) if n_players > MAX_EXACT_PLAYERS else None
    masks = coalition_masks(n_players) if orders is None else order_masks(orders)
    state_present, meta_present = present(masks)
    return exact_shapley(
        model,
        states,
        meta,
        background_states,
        background_meta,
        state_present,
        meta_present,
        masks,
        targets,
        temperature,
        scale=scale,
        resamples=resamples,
        seed=seed,
        orders=orders,
    )


class GroupShapExplainer:
    """Exact grouped SHAP values of the patient features for a fused model, as ``shap.Explanation``.

    Args:
        model: a :class:`LesionModel` (its ``from_image_state`` is what is explained).
        background_meta: encoded metadata rows (M, D) sampled from the training split.
        groups: feature group -> encoded column indices (``MetadataEncoder.feature_groups_``); every
            column in exactly one group. The group order is the feature order of the explanation.
        temperature: logits are divided by it before the softmax (1 = raw probabilities).
        scale: ``probability`` or ``log_odds`` of the explained class.
        resamples: bootstrap redraws of the background for each value's sampling error
            (``Explanation.error_std``); 0 = none.
        seed: seed of the redraws (and of the sampled orders).
        permutations: sampled player orders when there are more than :data:`MAX_EXACT_PLAYERS`
            groups (their standard error joins ``Explanation.error_std``).
    """

    def __init__(
        self,
        model: LesionModel,
        background_meta: np.ndarray,
        groups: Mapping[str, Sequence[int]],
        *,
        temperature: float = 1.0,
        scale: Scale = "probability",
        resamples: int = 0,
        seed: int = 0,
        permutations: int = DEFAULT_PERMUTATIONS,
    ) -> None:
        background_meta = np.asarray(background_meta, dtype=np.float32)
        if background_meta.ndim != 2 or len(background_meta) == 0:
            raise ConfigError(f"background_meta must be a non-empty (M, D) array, got shape {background_meta.shape}")
        self.model = model
        self.groups = check_groups(groups, background_meta.shape[1])
        self.background_meta = background_meta
        self.temperature = float(temperature)
        self.scale: Scale = scale
        self.resamples = int(resamples)
        self.seed = int(seed)
        self.permutations = int(permutations)

    @property
    def feature_names(self) -> list[str]:
        return list(self.groups)

    def predict_proba(self, states: np.ndarray | Tensor | None, meta: np.ndarray | Tensor) -> np.ndarray:
        """The explained probabilities (B, C) of the cases as they are (same head, same temperature)."""
        with preserved_state(self.model), torch.no_grad():
            self.model.eval()
            state, meta_t = as_input_tensor(states, self.model), as_input_tensor(meta, self.model)
            logits = state_logits(self.model, state, meta_t)
            return torch.softmax(logits / self.temperature, dim=-1).double().cpu().numpy()

    def explain(
        self,
        states: np.ndarray | Tensor | None,
        meta: np.ndarray | Tensor,
        targets: Sequence[int] | None = None,
        raw: pd.DataFrame | None = None,
    ) -> shap.Explanation:
        """SHAP values (B, G) of the target-class probability for cases with image states and meta (B, D).

        ``states`` are ``model.image_state`` of the cases' images: embeddings (B, F) of a late model,
        maps (B, C, h, w) of a model that fuses on the maps; None for a metadata-only model.

        ``targets`` None explains each case's predicted class. ``raw`` (B rows with the group names as
        columns, e.g. age/sex/localization) becomes the explanation's ``data`` for the plots.
        ``base_values + values.sum(1)`` equals the explained probability (or its log-odds); the
        background's sampling error of each value is ``error_std``.
        """
        meta_t = as_input_tensor(meta, self.model)
        if meta_t is None or meta_t.ndim != 2 or meta_t.shape[1] != self.background_meta.shape[1]:
            raise ConfigError(
                f"meta must be (B, {self.background_meta.shape[1]}), got "
                f"{None if meta_t is None else tuple(meta_t.shape)}"
            )
        if self.model.uses_image and states is None:
            raise ConfigError("this model looks at the image: pass the cases' image states")
        columns = group_columns(self.groups, meta_t.shape[1])
        res = grouped_shapley(
            self.model,
            as_input_tensor(states, self.model),
            meta_t,
            None,
            as_input_tensor(self.background_meta, self.model),
            len(self.groups),
            lambda masks: (np.ones(len(masks), dtype=bool), masks @ columns),
            targets,
            self.temperature,
            scale=self.scale,
            resamples=self.resamples,
            seed=self.seed,
            permutations=self.permutations,
        )
        return shap.Explanation(
            values=res["values"],
            base_values=res["base_values"],
            data=self._data(raw, len(meta_t)),
            feature_names=self.feature_names,
            error_std=res["values_se"],
        )

    def _data(self, raw: pd.DataFrame | None, n: int) -> np.ndarray | None:
        """The patient values shown next to the SHAP values (object array (B, G)), when given."""
        if raw is None:
            return None
        absent = [g for g in self.groups if g not in raw.columns]
        if absent:
            raise ConfigError(f"raw patient table lacks column '{absent[0]}'")
        if len(raw) != n:
            raise ConfigError(f"raw patient table has {len(raw)} rows for {n} cases")
        return raw[self.feature_names].to_numpy(dtype=object)


__all__ = [
    "DEFAULT_PERMUTATIONS",
    "LINKS",
    "MAX_EXACT_PLAYERS",
    "MAX_ROWS_PER_CALL",
    "MAX_STATE_VALUES_PER_CALL",
    "GroupShapExplainer",
    "Scale",
    "as_input_tensor",
    "bootstrap_weights",
    "check_groups",
    "coalition_masks",
    "coalition_probabilities",
    "exact_shapley",
    "group_columns",
    "grouped_shapley",
    "order_masks",
    "permutation_orders",
    "rows_per_call",
    "sampled_shapley_values",
    "shapley_values",
]
