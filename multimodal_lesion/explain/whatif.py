"""What-if for the patient features: a case's prediction across each feature's possible values.

For one case, every value of one feature is substituted while the image and the other features stay as
they are: age from 0 to 90 (an individual conditional expectation curve, ICE; another number over +-2
training standard deviations), each value of each categorical or boolean feature the encoder declares
(HAM10000: each sex, each localization). Cheap: the image state (``model.image_state``) is computed once
and only the metadata-conditioned part runs again (the head of a late model; the fused tail and head of
a model that fuses on the maps). The probabilities are the run's calibrated ones (the same temperature
as the displayed prediction), so the curve passes through the shown value at the case's own age."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..data.encoder import MetadataEncoder
from ..models import LesionModel
from .gradcam import GradCamExplainer, state_logits

#: Ages of the ICE curve (years).
AGES: tuple[float, ...] = tuple(float(a) for a in range(0, 91, 5))


@dataclass(frozen=True)
class WhatIf:
    """One case's probabilities (of every class) for each value of each patient feature."""

    classes: list[str]
    values: dict[str, list[str]] = field(default_factory=dict)  # feature -> values tried (ages as text)
    probs: dict[str, list[list[float]]] = field(default_factory=dict)  # feature -> one row of probs per value
    observed: dict[str, str] = field(default_factory=dict)  # feature -> the case's own value

    def curve(self, feature: str, cls: str) -> list[float]:
        """The probability of ``cls`` across the values of ``feature``."""
        k = self.classes.index(cls)
        return [row[k] for row in self.probs[feature]]

    def to_json(self) -> dict[str, object]:
        return {"classes": self.classes, "values": self.values, "probs": self.probs, "observed": self.observed}


#: Other numeric features are tried at the training mean plus these multiples of their standard deviation.
SPREAD: tuple[float, ...] = (-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0)


def feature_values(encoder: MetadataEncoder, ages: Sequence[float] = AGES) -> dict[str, list[object]]:
    """The values tried per feature, in the encoder's order: ``ages`` for an age, a grid of +-2 standard
    deviations around the training mean for another number, each fitted category (unknown included) otherwise."""
    numeric = list(getattr(encoder, "numeric", ("age",)))
    out: dict[str, list[object]] = {}
    for name in numeric:
        if name in ("age", "age_approx"):
            out[name] = list(ages)
        else:
            mean, std = encoder.means_[name], encoder.stds_[name]
            out[name] = [round(mean + k * std, 3) for k in SPREAD]
    out.update({column: list(cats) for column, cats in encoder.categories_.items()})
    return out


#: Ages at which the what-if figure shows the map (years).
MAP_AGES: tuple[float, ...] = (20.0, 40.0, 60.0, 80.0)


def cams_across_ages(
    explainer: GradCamExplainer,
    encoder: MetadataEncoder,
    patient: pd.DataFrame,
    image: torch.Tensor,
    target: int,
    ages: Sequence[float] = MAP_AGES,
) -> dict[str, np.ndarray]:
    """The case's map of class ``target`` at each of ``ages`` (the other features as they are), in one
    batched call: age -> (H, W). Of a model that fuses on the maps the map itself moves with age; of a
    late model only its channel weights can."""
    feature = next((f for f in ("age", "age_approx") if f in encoder.feature_groups_), None)
    if feature is None or not len(ages):
        return {}
    rows = pd.concat([patient] * len(ages), ignore_index=True)
    rows[feature] = list(ages)
    meta = torch.from_numpy(encoder.transform(rows).astype(np.float32)).to(image.device)
    maps = explainer.explain(image.expand(len(ages), *image.shape[1:]), meta, [int(target)] * len(ages))
    return {f"{a:g}": m for a, m in zip(ages, maps, strict=True)}


@torch.no_grad()
def what_if(
    model: LesionModel,
    encoder: MetadataEncoder,
    patient: pd.DataFrame,
    state: torch.Tensor | None,
    temperature: float,
    classes: Sequence[str],
    ages: Sequence[float] = AGES,
) -> WhatIf:
    """The case's calibrated probabilities for every value of every feature (the others held fixed).

    Args:
        patient: the case's raw patient row (one-row DataFrame with the encoder's columns).
        state: the case's image state (1, ...) as the model sees it (``model.image_state``); None for
            metadata-only models.
    """
    device = next(model.parameters()).device
    result = WhatIf(list(classes))
    for feature, values in feature_values(encoder, ages).items():
        rows = pd.concat([patient] * len(values), ignore_index=True)
        rows[feature] = values
        meta = torch.from_numpy(encoder.transform(rows).astype(np.float32)).to(device)
        image = None if state is None else state.expand(len(values), *state.shape[1:])
        probs = torch.softmax(state_logits(model, image, meta).float() / temperature, 1).cpu().numpy()
        result.values[feature] = [f"{v:g}" if isinstance(v, float) else str(v) for v in values]
        result.probs[feature] = np.round(probs, 6).tolist()
        own = patient[feature].iloc[0]
        result.observed[feature] = "unknown" if pd.isna(own) else (f"{own:g}" if isinstance(own, float) else str(own))
    return result
