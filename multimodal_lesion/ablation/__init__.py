"""Ablations: every model over lesion-grouped folds x seeds, with statistics and subgroup analysis."""
from .run import run_ablation

__all__ = ["run_ablation"]
