"""How a model behaves when patient metadata are absent: each feature removed, all removed.

Two ways to predict without a feature are measured side by side:

- ``unknown``: the feature is encoded as missing (age at the training mean with its missing flag, a
  category as ``unknown``) and the model predicts as it would for any such patient. A model trained
  with ``train.meta_dropout`` has seen this encoding often enough to fall back on the image.
- ``marginalise``: the prediction is averaged over the training patients' values of the absent
  features (a Monte-Carlo estimate of E[p(y | image, observed, absent)] over the training
  distribution of the absent ones), so "no metadata" cannot act as a learned signal.

The image states (``LesionModel.image_state``: a late model's pooled embedding, a map-fusion model's
maps at its fusion point) are computed once per split; only what follows them runs again per variant.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..runs import RunInputs
from .metrics import classification_metrics

#: Training patients drawn to marginalise absent features over.
MARGINAL_DRAWS = 32


def metadata_variants(features: Sequence[str]) -> dict[str, list[str]]:
    """Name -> features read as missing: full, each feature removed, all removed."""
    return {"full": [], **{f"no_{f}": [f] for f in features}, "none": list(features)}


#: Rows per call of ``from_image_state`` (a map-fusion model runs its tail on each).
CHUNK = 512


@torch.no_grad()
def _head_probs(
    inputs: RunInputs, state: torch.Tensor | None, meta: np.ndarray, to_probs: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    model = inputs.model.eval()
    meta_t = torch.from_numpy(meta).to(inputs.device)
    if state is None:
        return to_probs(model.forward_head(None, meta_t).float().cpu().numpy())
    logits = [
        model.from_image_state(state[i : i + CHUNK], meta_t[i : i + CHUNK]).float().cpu()
        for i in range(0, len(meta_t), CHUNK)
    ]
    return to_probs(torch.cat(logits).numpy())


def predict_without(
    inputs: RunInputs,
    rows: np.ndarray,
    features: Sequence[str],
    to_probs: Callable[[np.ndarray], np.ndarray],
    *,
    how: str = "unknown",
    embedding: torch.Tensor | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Probabilities of ``rows`` with ``features`` absent, read as ``unknown`` or marginalised (see module).

    ``embedding``: the rows' image states (``RunInputs.image_states_of``), computed when None.
    """
    embedding = inputs.image_states_of(rows) if embedding is None else embedding
    meta = inputs.meta[rows]
    if not features or how == "unknown":
        return _head_probs(inputs, embedding, inputs.encoder.blank(meta, features), to_probs)
    if how != "marginalise":
        raise ValueError(f"how must be 'unknown' or 'marginalise', got {how!r}")
    train = inputs.meta[inputs.indices("train")]
    draws = np.random.default_rng(seed).choice(len(train), size=min(MARGINAL_DRAWS, len(train)), replace=False)
    columns = [c for f in features for c in inputs.encoder.feature_groups_[f]]
    total: np.ndarray | float = 0.0
    for i in draws:
        filled = meta.copy()
        filled[:, columns] = train[i, columns]
        total = total + _head_probs(inputs, embedding, filled, to_probs)
    return np.asarray(total) / len(draws)


def missing_metadata_scores(
    inputs: RunInputs,
    split: str,
    to_probs: Callable[[np.ndarray], np.ndarray],
    *,
    ways: Sequence[str] = ("unknown", "marginalise"),
) -> dict[str, Any]:
    """Balanced accuracy, macro and key-class (and melanoma) AUROC of ``split`` for every metadata variant and way.

    ``to_probs`` turns logits into the probabilities scored (e.g. the run's balanced scaler, whose
    arg-max is the decision balanced accuracy rewards). Models without a metadata branch return {}.
    """
    if not inputs.model.uses_meta:
        return {}
    rows = inputs.indices(split)
    embedding = inputs.image_states_of(rows)
    y = inputs.targets[rows]
    lesions = inputs.dataset.metadata["lesion_id"].to_numpy()[rows]
    out: dict[str, Any] = {"split": split, "n_images": len(rows), "n_lesions": len(set(lesions))}
    for name, features in metadata_variants(list(inputs.encoder.feature_groups_)).items():
        for how in ways if features else ("unknown",):
            probs = predict_without(inputs, rows, features, to_probs, how=how, embedding=embedding)
            m = classification_metrics(
                y, probs, classes=inputs.schema.classes, key_class=inputs.schema.key_class, lesion_ids=lesions
            )
            out[name if not features else f"{name}/{how}"] = {
                k: m[k] for k in ("balanced_accuracy", "macro_auroc", "key_auroc", "melanoma_auroc", "accuracy")
            }
    return out
