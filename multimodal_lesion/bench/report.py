"""The explanation report (``explain_run``) timed at two sizes and extrapolated to the target size."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..io import read_json
from ..workflows import explain_run
from .context import BenchContext
from .measure import figure, measured


@dataclass(frozen=True)
class ReportTiming:
    """One ``explain_run``: cases, wall seconds and the pipeline's own stage timings."""

    cases: int
    seconds: float
    stages: dict[str, float]

    @property
    def untimed(self) -> float:
        """Seconds outside the pipeline's timed stages (loading the run, writing the HTML report...)."""
        return self.seconds - sum(self.stages.values())


def estimate_report_seconds(small: ReportTiming, large: ReportTiming, cases: int, faithfulness_cases: int) -> float:
    """Seconds of a ``cases``-case report from two measured ones.

    The faithfulness stage runs on at most ``faithfulness_cases`` cases, so it scales with
    min(cases, that cap) (an upper bound: its randomisation check is capped lower still); every other
    stage scales with the cases; the untimed rest is a fixed plus a per-case cost fitted on both runs.
    """
    per_case_rest = (large.untimed - small.untimed) / max(large.cases - small.cases, 1)
    fixed = max(small.untimed - small.cases * per_case_rest, 0.0)
    faith = large.stages.get("faithfulness", 0.0)
    linear = (sum(large.stages.values()) - faith) / large.cases
    faith_scaled = faith * min(cases, faithfulness_cases) / max(min(large.cases, faithfulness_cases), 1)
    return fixed + cases * (linear + max(per_case_rest, 0.0)) + faith_scaled


def time_report(ctx: BenchContext, run_dir: Path) -> list[dict]:
    """Figures of the explanation report of ``run_dir`` at the two sizes, and the target size extrapolated."""
    timings, figures = [], []
    for n in ctx.sizes.report_cases:
        ctx.log(f"explanation report, {n} cases")
        with measured() as record:
            explain_run(run_dir, ctx.work / f"report-{n}", n=n, show=False)
        stages = read_json(ctx.work / f"report-{n}" / "explanations.json").get("timings_seconds", {})
        timings.append(ReportTiming(n, record["seconds"], stages))
        where = ", ".join(f"{k} {v:.1f} s" for k, v in stages.items())
        figures.append(
            figure(
                f"explanation report, {n} cases",
                record["seconds"],
                "s",
                record,
                note=f"stages: {where}; untimed {timings[-1].untimed:.1f} s",
            )
        )
    goal, cap = ctx.sizes.report_target_cases, ctx.cfg.explain.faithfulness_cases
    estimate = estimate_report_seconds(timings[0], timings[-1], goal, cap)
    return [
        *figures,
        figure(
            f"explanation report, {goal} cases (extrapolated)",
            estimate,
            "s",
            target=("value", "<=", 180.0),
            note=f"faithfulness curves on the first {cap} cases only (explain.faithfulness_cases)",
        ),
    ]
