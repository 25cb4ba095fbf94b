"""Section ``explanations``: seconds per case of each explainer on a trained frozen run (grouped exact
SHAP against KernelExplainer on the live model), and of the whole explanation report; and what fusing on
the maps costs the exact games: grouped SHAP and the modality split per case of a map-fusion model
(every coalition re-runs the conditioned tail) against a late model on the same backbone and cases."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import replace
from ..errors import ConfigError
from ..explain import GradCamExplainer, GroupShapExplainer, modality_shapley
from ..models import LesionModel, create_model
from ..runs import LoadedRun, load_run
from ..runs.inputs import meta_layout
from ..workflows import train_run
from .context import BenchContext
from .kernel import LiveModelOutput, kernel_group_shap
from .measure import figure, measured
from .report import time_report


@dataclass
class ExplainInputs:
    """The cases and background that every explanation timing uses."""

    model: LesionModel
    images: torch.Tensor  # (n, 3, H, W) normalised
    meta: torch.Tensor  # (n, D)
    embeddings: torch.Tensor  # (n, F), single view: what the live model computes from the image
    targets: list[int]  # the predicted class of each case: the explained output
    background_meta: np.ndarray  # (M, D) training rows
    background_embeddings: np.ndarray  # (M, F) their cached embeddings
    groups: dict[str, list[int]]  # patient feature -> encoded columns


@torch.no_grad()
def explain_inputs(ctx: BenchContext, run: LoadedRun) -> ExplainInputs:
    """Test cases of a trained run, their predicted classes and a training-split background."""
    inputs, branch = run.inputs, run.inputs.model.image_branch
    if branch is None:
        raise ConfigError(f"bench explanations: model '{inputs.cfg.model.name}' does not look at the image")
    cases = inputs.indices("test")[: ctx.sizes.explain_cases]
    background = ctx.subsample(inputs.indices("train"), inputs.cfg.explain.background_size)
    images = inputs.normalized_images(cases)
    meta = torch.from_numpy(inputs.meta[cases]).to(inputs.device)
    emb = inputs.model.image_state(images)
    targets = inputs.model.from_image_state(emb, meta).argmax(1).tolist()
    return ExplainInputs(
        inputs.model,
        images,
        meta,
        emb,
        targets,
        inputs.meta[background],
        inputs.embeddings(show=False)[background],
        dict(inputs.encoder.feature_groups_),
    )


def per_case(n: int, explain_one: Callable[[int], Any], warm_up: bool = True) -> tuple[list[Any], dict[str, Any]]:
    """Run ``explain_one`` for cases 0..n-1 (after one untimed warm-up call); the record's seconds are per case."""
    if warm_up and n:
        explain_one(0)
    with measured() as record:
        out = [explain_one(i) for i in range(n)]
    record["seconds"] /= max(n, 1)
    return out, record


def _kernel_case(inputs: ExplainInputs, i: int, batch_size: int) -> np.ndarray:
    """KernelExplainer's grouped values of case ``i`` on the live two-input model."""
    live = LiveModelOutput(inputs.model, inputs.images[i : i + 1], inputs.targets[i], batch_size)
    return kernel_group_shap(live, inputs.meta[i].cpu().numpy(), inputs.background_meta, inputs.groups)


def time_explainers(ctx: BenchContext, inputs: ExplainInputs) -> tuple[list[dict], dict[str, Any]]:
    """Grad-CAM, grouped exact SHAP, KernelExplainer and modality attribution, seconds per case."""
    n, x, m, e, t = len(inputs.targets), inputs.images, inputs.meta, inputs.embeddings, inputs.targets
    with GradCamExplainer(inputs.model, ctx.cfg.explain.method) as cam:
        _, cam_rec = per_case(n, lambda i: cam.explain(x[i : i + 1], m[i : i + 1], [t[i]]))
    shap_explainer = GroupShapExplainer(inputs.model, inputs.background_meta, inputs.groups)
    grouped, shap_rec = per_case(
        n,
        lambda i: np.asarray(
            shap_explainer.explain(e[i : i + 1].cpu().numpy(), m[i : i + 1].cpu().numpy(), [t[i]]).values
        ).reshape(-1),
    )
    k = min(ctx.sizes.kernel_cases, n)
    kernel, kernel_rec = per_case(k, lambda i: _kernel_case(inputs, i, ctx.cfg.train.batch_size), warm_up=False)
    _, modality_rec = per_case(
        n,
        lambda i: modality_shapley(
            inputs.model,
            e[i : i + 1].cpu().numpy(),
            m[i : i + 1].cpu().numpy(),
            inputs.background_embeddings,
            inputs.background_meta,
            inputs.groups,
            [t[i]],
        ),
    )
    diff = float(np.max(np.abs(np.array(grouped[:k]) - np.array(kernel)))) if k else float("nan")
    bg = len(inputs.background_meta)
    return [
        figure(f"Grad-CAM ({ctx.cfg.explain.method}) per case", cam_rec["seconds"], "s", cam_rec),
        figure(
            "grouped exact SHAP on cached embedding per case",
            shap_rec["seconds"],
            "s",
            shap_rec,
            naive=kernel_rec["seconds"],
            target=("ratio", ">=", 100.0),
            note=f"8 coalitions x {bg} background rows on the head; naive = KernelExplainer",
        ),
        figure(
            "KernelExplainer on two-input model per case (naive)",
            kernel_rec["seconds"],
            "s",
            kernel_rec,
            note=f"{k} cases; the backbone re-runs for every evaluated metadata row",
        ),
        figure(
            "max |grouped SHAP - KernelExplainer|",
            diff,
            "",
            target=("value", "<=", 1e-4),
            note=f"over {k} cases x {len(inputs.groups)} groups",
        ),
        figure("modality attribution (16 coalitions) per case", modality_rec["seconds"], "s", modality_rec),
    ], {"cases": n, "kernel_cases": k, "background": bg, "grouped_values": grouped[:k], "kernel_values": kernel}


#: The late model and the map model whose exact games are timed side by side.
FUSION_PAIR = ("concat", "film_maps")


def _game_seconds(model: LesionModel, inputs: ExplainInputs, background_images: torch.Tensor) -> dict[str, Any]:
    """Seconds per case of grouped exact SHAP and of the modality split (background states paired per row)."""
    model.eval()
    with torch.no_grad():
        states = model.image_state(inputs.images)
        bg_states = torch.cat(
            [model.image_state(background_images[i : i + 32]) for i in range(0, len(background_images), 32)]
        )
    explainer = GroupShapExplainer(model, inputs.background_meta, inputs.groups)
    n, m, t = len(inputs.targets), inputs.meta, inputs.targets
    _, shap_rec = per_case(n, lambda i: explainer.explain(states[i : i + 1], m[i : i + 1], [t[i]]))
    _, split_rec = per_case(
        n,
        lambda i: modality_shapley(
            model, states[i : i + 1], m[i : i + 1], bg_states, inputs.background_meta, inputs.groups, [t[i]]
        ),
    )
    return {"shap": shap_rec, "modality": split_rec, "state": tuple(states.shape[1:])}


def time_fusion_kinds(ctx: BenchContext, run: LoadedRun, inputs: ExplainInputs) -> list[dict]:
    """Exact SHAP and modality split per case: a late model against a map model (untrained heads: the cost
    does not depend on the weights) on the run's backbone (a fresh single-scale branch of the same
    architecture when the run pools several scales, which a map model cannot), cases and background."""
    branch = run.inputs.model.image_branch
    assert branch is not None  # explain_inputs checked it
    model_cfg = run.inputs.cfg.model
    if model_cfg.multiscale:  # a map model pools only its last map: both get a single-scale branch of their own
        model_cfg, branch = dataclasses.replace(model_cfg, multiscale=False), None
    layout = meta_layout(run.inputs.encoder)
    background = ctx.subsample(run.inputs.indices("train"), len(inputs.background_meta))
    bg_images = run.inputs.normalized_images(background)
    seconds = {}
    for name in FUSION_PAIR:
        model = create_model(
            name,
            meta_dim=inputs.meta.shape[1],
            num_classes=run.inputs.schema.n_classes,
            cfg=model_cfg,
            image_branch=branch,
            meta_layout=layout,
        ).to(run.inputs.device)
        seconds[name] = _game_seconds(model, inputs, bg_images)
    late, maps = FUSION_PAIR
    bg = len(inputs.background_meta)
    note = f"{bg} background rows; image state {{}}; {maps}: every coalition re-runs the conditioned tail"
    return [
        figure(
            f"{game} per case, {name}",
            seconds[name][key]["seconds"],
            "s",
            seconds[name][key],
            naive=seconds[late][key]["seconds"] if name == maps else None,
            note=note.format(seconds[name]["state"]) + ("" if name == maps else f"; naive = {late} (reference)"),
        )
        for key, game in (("shap", "grouped exact SHAP"), ("modality", "modality split"))
        for name in FUSION_PAIR
    ]


def bench_explanations(ctx: BenchContext) -> dict[str, Any]:
    """Seconds per case of each explainer on a trained frozen run, and of the whole report."""
    cfg = replace(ctx.frozen_cfg, train={"epochs": ctx.sizes.report_epochs})
    run_dir = ctx.work / "run"
    ctx.log(f"training a {cfg.model.name} head for {cfg.train.epochs} epochs for the explanation run")
    train_run(cfg, run_dir, show=False)
    run = load_run(run_dir)
    inputs = explain_inputs(ctx, run)
    figures, details = time_explainers(ctx, inputs)
    figures += time_fusion_kinds(ctx, run, inputs)
    figures += time_report(ctx, run_dir)
    return {
        "figures": figures,
        "details": {
            **details,
            "model": cfg.model.name,
            "note": "explained output: softmax probability of the predicted class; live model without flip averaging",
        },
    }
