"""Ablations: every model over lesion-grouped folds x seeds, with statistics and subgroup analysis."""

from .run import GBM, Cell, CellContext, cell_splits, run_ablation, run_cells, shared_backbone

__all__ = ["GBM", "Cell", "CellContext", "cell_splits", "run_ablation", "run_cells", "shared_backbone"]
