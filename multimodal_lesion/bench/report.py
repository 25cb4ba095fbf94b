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


TARGET_SECONDS = 180.0  # the 100-case report, faithfulness on every case against the three baselines


def stage_figures(timing: ReportTiming, goal: int) -> list[dict]:
    """Seconds per case of each pipeline stage of one report, and of the whole, against the per-case budget."""
    budget = TARGET_SECONDS / goal
    per_case = [
        figure(f"report stage '{name}' per case", seconds / timing.cases, "s", note=f"{timing.cases} cases")
        for name, seconds in timing.stages.items()
    ]
    whole = figure(
        "explanation report per case (all stages, loading and writing)",
        timing.seconds / timing.cases,
        "s",
        target=("value", "<=", budget),
        note=f"{timing.cases} cases, faithfulness on every case; budget = {TARGET_SECONDS:g} s / {goal} cases",
    )
    return [*per_case, whole]


def time_report(ctx: BenchContext, run_dir: Path) -> list[dict]:
    """Figures of the explanation report of ``run_dir`` at the two sizes (faithfulness on every case), the
    seconds per case of each stage of the larger, and the target size extrapolated."""
    timings, figures = [], []
    for n in ctx.sizes.report_cases:
        ctx.log(f"explanation report, {n} cases")
        with measured() as record:
            explain_run(run_dir, ctx.work / f"report-{n}", n=n, settings={"faithfulness_cases": n}, show=False)
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
    goal = ctx.sizes.report_target_cases
    estimate = estimate_report_seconds(timings[0], timings[-1], goal, goal)
    return [
        *figures,
        *stage_figures(timings[-1], goal),
        figure(
            f"explanation report, {goal} cases (extrapolated)",
            estimate,
            "s",
            target=("value", "<=", TARGET_SECONDS),
            note="faithfulness curves on every case against the three baselines",
        ),
    ]
