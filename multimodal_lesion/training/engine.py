"""The one training loop: AdamW, warm-up + cosine, weighted CE or balanced sampling, label smoothing,
gradient clipping, early stopping on validation balanced accuracy, atomic checkpoints and resume.

It serves both training paths: end-to-end batches carry ``"image"``, frozen-path batches carry a
cached ``"embedding"``; the model's ``forward(batch)`` handles either.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..errors import CheckpointError, ConfigError
from ..runs import RunFolder, load_model_state, predict_logits, seed_everything, to_device
from ..tracking import Tracker, log_history


@dataclass
class FitResult:
    """What :func:`fit` learned: the best epoch and its validation score, and the per-epoch history."""

    best_epoch: int
    best_score: float
    history: list[dict[str, float]] = field(default_factory=list)


class _FitState(TypedDict):
    """The loop's progress, saved in ``last.pt`` so that a resumed run continues where it stopped."""

    epoch: int  # epochs done
    best_score: float  # best validation balanced accuracy so far
    best_epoch: int  # the epoch that scored it
    bad_epochs: int  # epochs since then without improvement (early stopping)
    history: list[dict[str, float]]  # one row of history.csv per epoch


class WeightAverage:
    """Exponential moving average of a model's state: parameters and batch-norm statistics.

    The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` over the first updates (the num_updates
    warm-up of TensorFlow's ExponentialMovingAverage), so the initial weights fade out quickly.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"config key 'train.ema_decay': expected 0 (off) or a number in (0, 1), got {decay!r}")
        self.decay, self.updates = decay, 0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        keep = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.state[k].lerp_(v.detach(), 1.0 - keep)
            else:
                self.state[k].copy_(v)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the backbone at ``backbone_lr`` and every other trainable parameter at ``lr``."""
    backbone = getattr(_unwrap(model), "image_branch", None)
    backbone_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) in backbone_ids], "lr": cfg.backbone_lr},
        {"params": [p for p in trainable if id(p) not in backbone_ids], "lr": cfg.lr},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Linear warm-up for ``warmup_epochs`` then cosine decay to zero, stepped every batch."""
    warmup, total = cfg.warmup_epochs * steps_per_epoch, max(1, cfg.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def class_weights(targets: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights, normalised to mean 1 (absent classes get weight 0)."""
    counts = np.bincount(targets, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / num_classes, 0.0)
    return torch.tensor(weights / weights[counts > 0].mean(), dtype=torch.float32)


class WeightedSmoothedCrossEntropy(nn.Module):
    """Cross-entropy with label smoothing where a class weight weighs the images of that class.

    ``nn.CrossEntropyLoss(weight=w, label_smoothing=e)`` instead weighs the smoothing term of every
    image by each *other* class's weight (pytorch/pytorch#104776): with inverse-frequency weights,
    every common-class image is pushed to give the rare classes probability, which floors their
    scores and costs their AUROC. Here the loss of image i is
    ``w[y_i] * ((1 - e) * -log p[y_i] + e * mean_c(-log p[c]))``, averaged with weights ``w[y_i]``
    as PyTorch averages a weighted loss; without weights it equals PyTorch's loss.
    """

    weight: torch.Tensor | None  # a buffer: moves with the module, saved in its state dict

    def __init__(self, weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits, dim=1)
        e = self.label_smoothing
        per_image = -(1.0 - e) * logp.gather(1, target[:, None])[:, 0] - e * logp.mean(dim=1)
        if self.weight is None:
            return per_image.mean()
        w = self.weight[target]
        return (w * per_image).sum() / w.sum()


def build_loss(cfg: TrainConfig, weights: torch.Tensor | None, device: torch.device) -> nn.Module:
    """The training loss of ``cfg``: class-weighted (``weights``) or plain, with label smoothing."""
    return WeightedSmoothedCrossEntropy(None if weights is None else weights.to(device), cfg.label_smoothing)


def validation_scores(y: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """What early stopping and history.csv need each epoch (the full metrics come at the end)."""
    from sklearn.metrics import balanced_accuracy_score, log_loss, roc_auc_score

    probs = torch.softmax(torch.from_numpy(logits).double(), 1).numpy()
    labels = np.arange(probs.shape[1])
    present = np.unique(y)
    auroc = float("nan")
    if len(present) > 1:
        auroc = (
            float(
                roc_auc_score(
                    y, probs[:, present] / probs[:, present].sum(1, keepdims=True), multi_class="ovr", labels=present
                )
            )
            if len(present) > 2
            else float(roc_auc_score(y == present[1], probs[:, present[1]]))
        )
    return {
        "balanced_accuracy": float(balanced_accuracy_score(y, probs.argmax(1))),
        "macro_auroc": auroc,
        "nll": float(log_loss(y, probs, labels=labels)),
    }


def train_epoch(
    model: nn.Module,
    batches: Iterable[dict],
    loss_fn: nn.Module,
    optimizer,
    scheduler,
    scaler: torch.amp.GradScaler,
    cfg: TrainConfig,
    device: torch.device,
    desc: str,
    show: bool,
    ema: WeightAverage | None = None,
) -> tuple[float, int, float]:
    """One pass over the training batches; returns (mean loss, images seen, seconds in forward/backward)."""
    _set_train_mode(model)
    trainable = [p for p in model.parameters() if p.requires_grad]  # not the frozen backbone, every step
    total, seen, compute = 0.0, 0, 0.0
    start = time.perf_counter()
    bar = tqdm(batches, desc=desc, leave=False, disable=not show, unit="batch")
    for batch in bar:
        t0 = time.perf_counter()
        batch = to_device(batch, device, cfg.channels_last)
        with torch.autocast(device.type, enabled=cfg.amp):  # float16 on a GPU, bfloat16 on the CPU
            loss = loss_fn(model(batch).float(), batch["target"])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if ema is not None:
            ema.update(_unwrap(model))
        if device.type == "cuda":
            torch.cuda.synchronize()
        compute += time.perf_counter() - t0
        n = len(batch["target"])
        total, seen = total + loss.item() * n, seen + n
        bar.set_postfix(loss=f"{total / seen:.4f}", img_s=f"{seen / (time.perf_counter() - start):.0f}")
    return total / max(seen, 1), seen, compute


def _set_train_mode(model: nn.Module) -> None:
    """Training mode, except a frozen backbone, which keeps its batch-norm statistics (eval mode)."""
    model.train()
    branch = getattr(_unwrap(model), "image_branch", None)
    if branch is not None and not any(p.requires_grad for p in branch.parameters()):
        branch.eval()


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _restore(
    out: RunFolder,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ema: WeightAverage | None,
) -> tuple[_FitState, dict[str, torch.Tensor]]:
    """Load ``last.pt`` into the model, optimiser, scheduler (and average): (loop state, best weights so far).

    A checkpoint that does not fit them (another model, another optimiser) is a one-line CheckpointError.
    """
    ckpt = out.load_last()
    path = out / "last.pt"
    load_model_state(model, ckpt["model"], path)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state = cast(_FitState, {k: ckpt["state"][k] for k in _FitState.__annotations__})
        if ema is not None:
            ema.state, ema.updates = ckpt["ema"], ckpt["ema_updates"]
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if {k: tuple(v.shape) for k, v in ckpt["best_model"].items()} != shapes:
            raise ValueError("its best_model weights do not fit this model")
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: cannot resume from it ({type(exc).__name__}: {str(exc)[:160]})") from None
    return state, ckpt["best_model"]


def fit(
    model: nn.Module,
    train_batches: Iterable[dict],
    val_batches: Iterable[dict],
    cfg: TrainConfig,
    folder: RunFolder | str | Path | None = None,
    *,
    weights: torch.Tensor | None = None,
    resume: bool = False,
    show_progress: bool = True,
    tracker: Tracker | None = None,
) -> FitResult:
    """Train ``model`` and keep the weights of the epoch with the best validation balanced accuracy
    (with ``cfg.ema_decay`` > 0, the moving average of the weights is what is validated and kept).

    With a run ``folder`` it writes ``last.pt`` (everything needed to resume) and ``best.pt`` atomically
    each epoch, and ``history.csv``; ``resume=True`` continues from ``last.pt`` and, because every
    epoch is seeded by (seed, epoch), ends with the same weights as an uninterrupted run. A ``tracker``
    gets each epoch's history row (a resumed run's earlier rows first) at step = epoch, from the main process.
    """
    device = next(model.parameters()).device
    out = RunFolder(folder) if folder is not None and not isinstance(folder, RunFolder) else folder
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, len(train_batches))  # type: ignore[arg-type]
    loss_fn = build_loss(cfg, weights, device)
    state: _FitState = {"epoch": 0, "best_score": -1.0, "best_epoch": 0, "bad_epochs": 0, "history": []}
    best_weights = {k: v.detach().clone() for k, v in _unwrap(model).state_dict().items()}
    ema = WeightAverage(_unwrap(model), cfg.ema_decay) if cfg.ema_decay != 0 else None
    if resume and out is not None and out.has_last():
        state, best_weights = _restore(out, _unwrap(model), optimizer, scheduler, ema)
    show = show_progress and _is_main()
    tracker = tracker if _is_main() else None
    log_history(tracker, state["history"])
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda")
    for epoch in range(state["epoch"], cfg.epochs):
        if state["bad_epochs"] >= cfg.patience:
            break
        seed_everything(cfg.seed * 100_003 + epoch)
        for b in (train_batches, val_batches):
            if hasattr(b, "set_epoch"):
                b.set_epoch(epoch)
        t0 = time.perf_counter()
        loss, seen, _ = train_epoch(
            model,
            train_batches,
            loss_fn,
            optimizer,
            scheduler,
            scaler,
            cfg,
            device,
            f"epoch {epoch + 1}/{cfg.epochs}",
            show,
            ema,
        )
        seconds = time.perf_counter() - t0
        live = None
        if ema is not None:  # validate (and keep) the averaged weights
            live = {k: v.detach().clone() for k, v in _unwrap(model).state_dict().items()}
            _unwrap(model).load_state_dict(ema.state)
        logits, y, _ = predict_logits(_unwrap(model), val_batches, device, amp=cfg.amp)
        val = validation_scores(y, logits)
        state["history"].append(
            {
                "epoch": epoch + 1,
                "train_loss": round(loss, 6),
                "val_loss": round(val["nll"], 6),
                "val_balanced_accuracy": round(val["balanced_accuracy"], 6),
                "val_macro_auroc": round(val["macro_auroc"], 6),
                "lr": optimizer.param_groups[-1]["lr"],
                "seconds": round(seconds, 3),
                "images_per_s": round(seen / max(seconds, 1e-9), 1),
            }
        )
        if val["balanced_accuracy"] > state["best_score"]:
            state.update({"best_score": val["balanced_accuracy"], "best_epoch": epoch + 1, "bad_epochs": 0})
            best_weights = {k: v.detach().clone() for k, v in _unwrap(model).state_dict().items()}
        else:
            state["bad_epochs"] += 1
        log_history(tracker, state["history"][-1:])
        if live is not None:
            _unwrap(model).load_state_dict(live)
        state["epoch"] = epoch + 1
        if show:
            h = state["history"][-1]
            tqdm.write(
                f"epoch {h['epoch']:3d}  loss {h['train_loss']:.4f}  val BA {h['val_balanced_accuracy']:.4f}"
                f"  val AUROC {h['val_macro_auroc']:.4f}  {h['images_per_s']:.0f} img/s"
            )
        if out is not None and _is_main():
            extra = {} if ema is None else {"ema": ema.state, "ema_updates": ema.updates}
            out.save_last(
                {
                    "model": _unwrap(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "best_model": best_weights,
                    "state": state,
                    **extra,
                }
            )
            out.save_best(best_weights, state["best_epoch"])
            out.write_history(state["history"])
    _unwrap(model).load_state_dict(best_weights)
    return FitResult(state["best_epoch"], state["best_score"], state["history"])
