"""The naive baseline of grouped SHAP: shap's KernelExplainer on the live two-input model.

KernelExplainer sees one "group switch" feature per patient-feature group. The background is
``[[j, j, ..., j] for j in range(M)]`` (background row j's index once per group) and the explained
instance is ``[-1, ..., -1]``; :class:`GroupSwitchModel` decodes each row it is asked about (group g
takes the case's own encoded columns where its switch is -1, else background row ``switch``'s) and runs
the whole model, backbone included, on it. That is interventional grouped SHAP of the metadata groups
with the background rows, the quantity :class:`~multimodal_lesion.explain.GroupShapExplainer` computes
exactly; with a handful of groups KernelExplainer enumerates every coalition, so the two agree to
rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import shap
import torch
from torch import nn


class LiveModelOutput:
    """The two-input model as a function of metadata rows for one fixed image.

    Every call re-runs the whole model (backbone included) on the image, once per row: the naive way.

    Args:
        model: the fused model (``forward`` on ``{"image", "meta"}`` batches).
        image: the normalised image (1, 3, H, W) on the model's device.
        target: the class whose softmax probability is returned.
        batch_size: metadata rows per forward pass.
    """

    def __init__(self, model: nn.Module, image: torch.Tensor, target: int, batch_size: int) -> None:
        self.model, self.image, self.target, self.batch_size = model, image, target, batch_size

    @torch.no_grad()
    def __call__(self, meta_rows: np.ndarray) -> np.ndarray:
        """The target-class probability (N,) float64 for encoded metadata rows (N, D)."""
        out = []
        for start in range(0, len(meta_rows), self.batch_size):
            meta = torch.as_tensor(
                np.asarray(meta_rows[start : start + self.batch_size], np.float32), device=self.image.device
            )
            logits = self.model({"image": self.image.expand(len(meta), -1, -1, -1), "meta": meta})
            out.append(torch.softmax(logits.float(), 1)[:, self.target])
        return torch.cat(out).double().cpu().numpy()


class GroupSwitchModel:
    """KernelExplainer's model: rows of group switches decoded into metadata rows for a live model.

    Args:
        live: the model output (N,) on encoded metadata rows (N, D), e.g. a :class:`LiveModelOutput`.
        meta: the explained case's encoded metadata (D,).
        background_meta: the background's encoded metadata (M, D).
        groups: patient feature -> encoded columns; the order is the switches' order.
    """

    def __init__(
        self,
        live: Callable[[np.ndarray], np.ndarray],
        meta: np.ndarray,
        background_meta: np.ndarray,
        groups: Mapping[str, Sequence[int]],
    ) -> None:
        self.live, self.meta, self.background_meta = live, np.asarray(meta), np.asarray(background_meta)
        self.columns = [np.asarray(cols, dtype=np.int64) for cols in groups.values()]

    def decode(self, switches: np.ndarray) -> np.ndarray:
        """Metadata rows (N, D) for switch rows (N, G): -1 keeps the case's group, j takes background row j's."""
        switches = np.asarray(switches)
        rows = np.repeat(self.meta[None].astype(np.float64), len(switches), axis=0)
        for g, cols in enumerate(self.columns):
            swapped = np.flatnonzero(switches[:, g] >= 0)
            rows[np.ix_(swapped, cols)] = self.background_meta[switches[swapped, g].astype(np.int64)][:, cols]
        return rows

    def __call__(self, switches: np.ndarray) -> np.ndarray:
        """The live model's output (N,) on the decoded rows."""
        return self.live(self.decode(switches))


def kernel_group_shap(
    live: Callable[[np.ndarray], np.ndarray],
    meta: np.ndarray,
    background_meta: np.ndarray,
    groups: Mapping[str, Sequence[int]],
) -> np.ndarray:
    """KernelExplainer's SHAP values (G,) of the patient-feature groups of one case on the live model.

    Args:
        live: the model output (N,) on metadata rows (N, D): a :class:`LiveModelOutput` of the case's image.
        meta: the case's encoded metadata (D,).
        background_meta: the background's encoded metadata (M, D).
        groups: patient feature -> encoded columns.
    """
    n_groups, n_background = len(groups), len(background_meta)
    background = np.repeat(np.arange(n_background, dtype=np.float64)[:, None], n_groups, axis=1)
    model = GroupSwitchModel(live, meta, background_meta, groups)
    explainer = shap.KernelExplainer(model, background, link="identity")
    return np.asarray(explainer.shap_values(np.full((1, n_groups), -1.0), silent=True)).reshape(-1)
