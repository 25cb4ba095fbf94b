"""Running the sections in one process and reporting them: the JSON results and the text table."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from ..config import to_dict
from ..errors import ConfigError
from ..io import write_json
from .ablation import bench_ablation
from .context import BenchContext, build_context
from .data import bench_data
from .duplicates import bench_duplicates
from .embeddings import bench_embeddings
from .explanations import bench_explanations
from .measure import MEMORY_METHOD, machine, measured
from .sizes import BenchSizes
from .training import bench_training

#: The benchmark's sections in the order they run: name -> function of the shared context.
SECTIONS: Mapping[str, Callable[[BenchContext], dict]] = MappingProxyType(
    {
        "data": bench_data,
        "training": bench_training,
        "embeddings": bench_embeddings,
        "ablation": bench_ablation,
        "explanations": bench_explanations,
        "duplicates": bench_duplicates,
    }
)


def run_benchmark(
    data: str | None,
    json_path: str | None,
    *,
    tiny: bool = False,
    show: bool = True,
    config: str | None = None,
    overrides: Sequence[str] = (),
    sections: Sequence[str] | None = None,
    sizes: BenchSizes | None = None,
) -> dict[str, Any]:
    """Run the benchmark sections on ``data`` (None: the synthetic dataset) and return the results.

    Args:
        data: a HAM10000 root, or None for the synthetic dataset.
        json_path: where to write the results (with the machine next to each section), or None.
        tiny: a tiny synthetic dataset and tiny sizes (seconds, for tests).
        show: print progress (the caller prints :func:`format_table` of the results).
        config: an experiment TOML file.
        overrides: ``section.key=value`` overrides (e.g. the ablation's batch size).
        sections: a subset of :data:`SECTIONS` (None: all).
        sizes: the subsample sizes (:func:`parse_sizes` builds them from ``KEY=VALUE`` strings).

    Raises:
        ConfigError: an unknown section name, or a size below 1.
    """
    unknown = [name for name in sections or () if name not in SECTIONS]
    if unknown:
        raise ConfigError(f"bench: unknown section(s) {', '.join(unknown)} (valid: {', '.join(SECTIONS)})")
    _check_sizes(sizes)
    with tempfile.TemporaryDirectory(prefix="mmlesion-bench-") as tmp:
        ctx = build_context(data, tiny, show, Path(tmp), config, overrides, sizes)
        results: dict[str, Any] = {
            "machine": machine(ctx.device),
            "tiny": tiny,
            "data_root": str(ctx.dataset.root),
            "images_total": len(ctx.dataset.metadata),
            "sizes": asdict(ctx.sizes),
            "config_file": config,
            "overrides": list(overrides),
            "config": to_dict(ctx.cfg),
            "memory_method": MEMORY_METHOD,
            "sections": {},
        }
        for name in sections or SECTIONS:
            ctx.log(f"section {name}")
            with measured() as record:
                section = SECTIONS[name](ctx)
            results["sections"][name] = {
                **section,
                "machine": machine(ctx.device),
                "seconds": round(record["seconds"], 2),
                "memory": record["memory"],
            }
    results["targets"] = [
        {"section": s, **f} for s, sec in results["sections"].items() for f in sec["figures"] if "target" in f
    ]
    if json_path:
        write_json(json_path, results)
    return results


def _check_sizes(sizes: BenchSizes | None) -> None:
    """Every subsample size is at least 1, and the second report size is the larger (their difference is timed)."""
    for key, value in asdict(sizes or BenchSizes()).items():
        values = value if isinstance(value, tuple) else (value,)
        if any(v < 1 for v in values):
            raise ConfigError(f"bench size '{key}': must be >= 1, got {','.join(map(str, values))}")
    if sizes is not None and sizes.report_cases[0] >= sizes.report_cases[1]:
        raise ConfigError(f"bench size 'report_cases': the second must be the larger, got {sizes.report_cases}")


def _fmt(value: float | None) -> str:
    if value is None or not np.isfinite(value):
        return "-"
    magnitude = abs(value)
    return f"{value:.2e}" if 0 < magnitude < 0.01 else f"{value:,.3f}" if magnitude < 10 else f"{value:,.1f}"


def _row(section: str, fig: Mapping[str, Any], load: float) -> list[str]:
    target = fig.get("target")
    met = "-" if target is None else ("yes" if target["met"] else "MISSED")
    goal = "-" if target is None else f"{target['on']} {target['op']} {target['limit']:g}"
    ratio = f"{fig['ratio']:.1f}x" if "ratio" in fig else "-"
    peak = fig.get("memory", {}).get("peak_anon_mb")
    return [
        section,
        fig["name"],
        f"{_fmt(fig['value'])} {fig['unit']}".strip(),
        _fmt(fig.get("naive")),
        ratio,
        goal,
        met,
        _fmt(peak),
        f"{load:.1f}",
    ]


def format_table(results: Mapping[str, Any]) -> str:
    """The results as a fixed-width text table, the machine and the subsample sizes above it.

    ``ratio`` is the speed-up over the naive way; ``load`` the 1-minute load average after the section.
    """
    header = ["section", "figure", "value", "naive", "ratio", "target", "met", "peak anon MB", "load"]
    rows = [header] + [
        _row(s, f, sec["machine"]["load_average_1m"]) for s, sec in results["sections"].items() for f in sec["figures"]
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    m = results["machine"]
    top = (
        f"machine: {m['cores']} cores, {m['torch_threads']} torch threads, {m['device']}, torch {m['torch']}, "
        f"timm {m['timm']}, load average {m['load_average_1m']} at start\n"
        f"data: {results['data_root']} ({results['images_total']} images); subsample: "
        + ", ".join(f"{k}={v}" for k, v in results["sizes"].items())
        + ("  [tiny]" if results["tiny"] else "")
    )
    notes = [
        f"{s}/{f['name']}: {f['note']}"
        for s, sec in results["sections"].items()
        for f in sec["figures"]
        if f.get("note")
    ]
    return "\n".join([top, lines[0], "-" * len(lines[0]), *lines[1:], "notes:", *("  " + n for n in notes)])
