"""Ablations: every model over lesion-grouped folds x seeds, with statistics and subgroup analysis."""

from .backends import BACKENDS, run_cells
from .run import GBM, Cell, CellContext, cell_splits, run_ablation, shared_backbone

__all__ = ["BACKENDS", "GBM", "Cell", "CellContext", "cell_splits", "run_ablation", "run_cells", "shared_backbone"]
