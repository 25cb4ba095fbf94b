"""The benchmark harness runs end to end on a tiny input and writes every section; no timing assertions."""

from __future__ import annotations

import ast
import itertools
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import multimodal_lesion.bench
from multimodal_lesion.bench import (
    SECTIONS,
    BenchSizes,
    JpegImages,
    ReportTiming,
    StepTimer,
    estimate_report_seconds,
    format_table,
    kernel_group_shap,
    measured,
    parse_sizes,
    run_benchmark,
)
from multimodal_lesion.data.cache import decode_resized
from multimodal_lesion.errors import ConfigError
from multimodal_lesion.io import read_json


@pytest.mark.slow
def test_tiny_benchmark_writes_json_with_all_sections(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MMLESION_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench.json"
    results = run_benchmark(None, str(out), tiny=True, show=False)
    saved = read_json(out)
    assert set(saved["sections"]) == set(SECTIONS)
    assert saved["machine"]["cores"] == os.cpu_count() and saved["tiny"] is True
    for name, section in saved["sections"].items():
        assert section["figures"], name
        assert section["machine"]["torch_threads"] >= 1 and "peak_anon_mb" in section["memory"]
        assert all(math.isfinite(f["value"]) for f in section["figures"]), name
    names = {f["name"] for f in saved["targets"]}
    assert any("outside forward/backward" in n for n in names) and any("full ablation" in n for n in names)
    diff = next(f for f in saved["sections"]["explanations"]["figures"] if f["name"].startswith("max |grouped"))
    assert diff["value"] <= 1e-4  # exact grouped SHAP equals KernelExplainer on the live two-input model
    table = format_table(results)
    assert all(name in table for name in SECTIONS)


@pytest.mark.slow
def test_the_explanation_section_runs_on_a_multiscale_run(tmp_path: Path, monkeypatch) -> None:
    """The real-data preset pools several scales; the late-vs-map comparison gives the map model (which
    cannot) a single-scale branch instead of refusing, and times both games."""
    monkeypatch.setenv("MMLESION_CACHE", str(tmp_path / "cache"))
    results = run_benchmark(
        None, None, tiny=True, show=False, overrides=["model.multiscale=true"], sections=["explanations"]
    )
    names = {f["name"] for f in results["sections"]["explanations"]["figures"]}
    assert {"grouped exact SHAP per case, film_maps", "modality split per case, concat"} <= names


def test_measured_sees_numpy_and_torch_allocations() -> None:
    with measured() as record:
        a = np.ones(64 * 2**20 // 8)  # 64 MB, numpy
        b = torch.ones(64 * 2**20 // 4)  # 64 MB, torch CPU
    assert record["seconds"] >= 0 and a.size and b.numel()
    if record["memory"]["peak_anon_mb"] is not None:  # Linux: psutil splits anonymous and file-backed
        assert record["memory"]["peak_anon_mb"] >= 100


def test_step_timer_splits_forward_and_backward_and_removes_hooks() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 7))
    with StepTimer(model, torch.device("cpu")) as timer:
        for _ in range(3):
            model(torch.randn(32, 64)).sum().backward()
    assert timer.forward_seconds > 0 and len(timer.spans) == 3 and timer.backward_seconds > 0
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert not any(getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())


def test_naive_jpeg_source_decodes_the_same_pixels_as_the_cache(tiny_ham: Path) -> None:
    path = str(next((tiny_ham / "HAM10000_images_part_1").glob("*.jpg")))
    naive = JpegImages([path], (64, 96))
    assert len(naive) == 1
    np.testing.assert_array_equal(naive[0], decode_resized(path, (64, 96)))


def test_parse_sizes_applies_pairs_and_names_bad_keys() -> None:
    sizes = parse_sizes(["train_steps=5", "report_cases=2,6"])
    assert sizes.train_steps == 5 and sizes.report_cases == (2, 6) and sizes.data_images == BenchSizes().data_images
    with pytest.raises(ConfigError, match="nope"):
        parse_sizes(["nope=1"])
    with pytest.raises(ConfigError, match="train_steps=x"):
        parse_sizes(["train_steps=x"])


def test_report_estimate_caps_the_faithfulness_stage() -> None:
    # fixed 5 s untimed + 0.1 s untimed per case; 1 s per case of other stages; faithfulness 2 s per case (cap 20)
    small = ReportTiming(2, 5 + 0.2 + 2 + 4, {"gradcam": 2.0, "faithfulness": 4.0})
    large = ReportTiming(10, 5 + 1.0 + 10 + 20, {"gradcam": 10.0, "faithfulness": 20.0})
    assert math.isclose(estimate_report_seconds(small, large, 100, 20), 5 + 100 * 1.1 + 20 * 2)


def test_kernel_baseline_equals_exact_interventional_group_shapley() -> None:
    # a non-additive function of 4 encoded columns in 3 groups; Shapley values by brute force over coalitions
    groups = {"age": [0], "sex": [1, 2], "site": [3]}
    rng = np.random.default_rng(0)
    case, background = rng.normal(size=4), rng.normal(size=(5, 4))

    def f(rows: np.ndarray) -> np.ndarray:
        return np.tanh(rows @ [0.5, -1.0, 0.3, 2.0] + rows[:, 0] * rows[:, 3] - rows[:, 1] * rows[:, 2])

    def value(coalition: set[str]) -> float:
        rows = background.copy()
        for name in coalition:
            rows[:, groups[name]] = case[groups[name]]
        return float(f(rows).mean())

    names, g = list(groups), len(groups)
    exact = [
        sum(
            math.factorial(len(s))
            * math.factorial(g - len(s) - 1)
            / math.factorial(g)
            * (value(set(s) | {name}) - value(set(s)))
            for k in range(g)
            for s in itertools.combinations([n for n in names if n != name], k)
        )
        for name in names
    ]
    np.testing.assert_allclose(kernel_group_shap(f, case, background, groups), exact, atol=1e-8)


def _private_imports(tree: ast.Module) -> list[str]:
    """Private names this module takes from another module: imported, or read as an imported module's attribute."""
    found, imported = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found += [alias.name] if any(p.startswith("_") for p in alias.name.split(".")) else []
                imported.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            parts = (node.module or "").split(".")
            found += [
                f"{node.module}.{a.name}"
                for a in node.names
                if a.name.startswith("_") or any(p.startswith("_") for p in parts)
            ]
            imported.update(a.asname or a.name for a in node.names)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in imported
            and node.attr.startswith("_")
            and not node.attr.endswith("__")
        ):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_bench_package_uses_no_private_name_of_another_module() -> None:
    folder = Path(multimodal_lesion.bench.__file__).parent
    offenders = {p.name: _private_imports(ast.parse(p.read_text())) for p in sorted(folder.glob("*.py"))}
    assert len(offenders) >= 5 and not any(offenders.values()), offenders
