"""Benchmark harness: every fast path timed against the naive way, in the same run, on the same machine.

:func:`run_benchmark` measures five sections (data, training, embeddings, ablation, explanations) on a
subsample, prints a table and writes JSON with the machine next to each figure; each section is one
module here and uses the library's public API only. Each figure carries its own peak memory (see
:mod:`.measure`): anonymous and file-backed resident memory sampled every 10 ms, the growth of the
``ru_maxrss`` high-water mark and the peak of the largest finished child process.
"""

from .context import BenchContext, JpegImages, build_context
from .kernel import GroupSwitchModel, LiveModelOutput, kernel_group_shap
from .measure import MEMORY_METHOD, StepTimer, TimedIterator, figure, machine, measured, torch_threads
from .report import ReportTiming, estimate_report_seconds
from .run import SECTIONS, format_table, run_benchmark
from .sizes import TINY_OVERRIDES, TINY_SIZES, BenchSizes, parse_sizes

__all__ = [
    "MEMORY_METHOD",
    "SECTIONS",
    "TINY_OVERRIDES",
    "TINY_SIZES",
    "BenchContext",
    "BenchSizes",
    "GroupSwitchModel",
    "JpegImages",
    "LiveModelOutput",
    "ReportTiming",
    "StepTimer",
    "TimedIterator",
    "build_context",
    "estimate_report_seconds",
    "figure",
    "format_table",
    "kernel_group_shap",
    "machine",
    "measured",
    "parse_sizes",
    "run_benchmark",
    "torch_threads",
]
