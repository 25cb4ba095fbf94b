"""The faithfulness verdicts and the randomisation curve of a report as CSV and markdown tables.

``faithfulness.csv`` / ``.md``: per measure and baseline, the CAM's and the baseline's means, the
paired difference (positive = the CAM did better), its bootstrap CI and the verdict.
``randomisation.csv`` / ``.md``: per cascading stage (and the random-logit check), mean Spearman and
SSIM over the valid cases, how many were valid and the verdict.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from ..explain.randomisation import StageResult
from ..explain.results import CohortExplanation
from ..io import atomic_write


def comparison_frame(cohort: CohortExplanation) -> pd.DataFrame:
    """One row per (measure, baseline): n, means, paired difference, CI, verdict."""
    return pd.DataFrame([asdict(c) for c in cohort.comparisons])


def randomisation_frame(cohort: CohortExplanation) -> pd.DataFrame:
    """One row per cascading stage from the head down, then the random-logit check."""
    stages: list[StageResult] = [*cohort.randomisation, *([cohort.random_logit] if cohort.random_logit else [])]
    return pd.DataFrame(
        [
            {
                "stage": s.stage,
                "n": len(s.cases),
                "n_valid": s.n_valid,
                "spearman": s.spearman,
                "ssim": s.ssim,
                "invalid": s.reasons(),
                "verdict": s.verdict,
            }
            for s in stages
        ]
    )


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def markdown(frame: pd.DataFrame) -> str:
    """A plain markdown table (no tabulate dependency), floats to 3 decimals."""
    if frame.empty:
        return "(none)\n"
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_faithfulness_tables(out: str | Path, cohort: CohortExplanation) -> dict[str, Path]:
    """Write ``faithfulness.{csv,md}`` and ``randomisation.{csv,md}`` into ``out``; returns their paths."""
    out = Path(out)
    paths = {}
    for name, frame in (("faithfulness", comparison_frame(cohort)), ("randomisation", randomisation_frame(cohort))):
        for suffix, text in (("csv", frame.to_csv(index=False)), ("md", markdown(frame))):
            path = out / f"{name}.{suffix}"
            with atomic_write(path) as fh:
                fh.write(text)
            paths[f"{name}_{suffix}"] = path
    return paths


__all__ = ["comparison_frame", "markdown", "randomisation_frame", "write_faithfulness_tables"]
