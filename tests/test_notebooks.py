"""The notebooks: committed without outputs, free of model code, and executed top to bottom.

Execution runs each notebook in a fresh kernel started with this interpreter (so a CI venv's
packages are the ones used, whatever kernelspecs the machine has), on the synthetic default (the
real-data variable is removed from the kernel's environment), with caches and outputs in temp
folders. The kernel reports its ``sys.prefix`` and CPU seconds in an appended cell.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from multimodal_lesion.data.constants import DATA_ENV

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
KERNEL_NAME = "mmlesion-test-python"
TIMEOUT_S = 900  # per cell; each notebook takes ~1-3 min on two idle cores
PROBE = (
    "import json, resource, sys\n"
    "_usage = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]\n"
    "print('KERNEL_PROBE ' + json.dumps({'prefix': sys.prefix, "
    "'cpu_s': sum(u.ru_utime + u.ru_stime for u in _usage)}))"
)

#: Per notebook: files it must write under its output folder, and text its outputs must contain.
EXPECTED: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "01_eda.ipynb": (
        ("eda/summary.json", "eda/missing_values.csv", "eda/class_counts.png", "eda/age_by_class.png"),
        ("lesions have several images", "lesions in more than one split: 0"),
    ),
    "02_ablation.ipynb": (
        (
            "ablation/summary.md",
            "ablation/comparison.csv",
            "ablation/subgroups.md",
            "ablation/per_class_sensitivity.csv",
            "ablation/balanced_accuracy.png",
        ),
        ("ablation done in", "balanced accuracy vs image_only"),
    ),
    "03_explanations.ipynb": (
        ("run/best.pt", "run/metrics.json", "report/index.html", "report/explanations.json"),
        ("recomputed SHAP values equal the report's", "planted signal recovered: age ranks first"),
    ),
}

#: Code that would mean a notebook trains or defines a model itself instead of calling the package.
MODEL_CODE = re.compile(r"^\s*class\s|nn\.Module|torch\.optim|\.backward\(|def forward\(|import torch\b", re.M)


def repo_notebooks() -> list[Path]:
    """Every notebook in the repository: tracked or untracked-but-not-ignored (git), else a folder walk."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", "*.ipynb"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        paths = [ROOT / p for p in listed]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for p in ROOT.rglob("*.ipynb") if not any(s.startswith(".") for s in p.relative_to(ROOT).parts)]
    return sorted(p for p in paths if p.is_file())


def code_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if c.cell_type == "code"]


def test_the_three_notebooks_exist():
    assert set(EXPECTED) <= {p.name for p in NOTEBOOK_DIR.glob("*.ipynb")}


@pytest.mark.parametrize("path", repo_notebooks(), ids=lambda p: str(p.relative_to(ROOT)))
def test_notebook_is_committed_without_outputs(path: Path):
    text = path.read_text(encoding="utf-8")
    assert '"output_type"' not in text, f"{path.name}: has outputs (clear them before committing)"
    nb = nbformat.reads(text, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(code_cells(nb)):
        assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: code cell {i} has outputs"
    assert "widgets" not in nb.metadata, f"{path.name}: widget state saved in the metadata"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_looks_at_results_only(name: str):
    """Parameters first, a markdown section before each step, the public API imported, no model code."""
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    first = code_cells(nb)[0]
    assert "parameters" in first.metadata.get("tags", []) and "os.environ" in first.source
    assert "MMLESION_NB_OUT" in first.source and DATA_ENV in first.source
    source = "\n".join(c.source for c in code_cells(nb))
    assert "import multimodal_lesion as mml" in first.source  # the public API; tests/test_api.py bans the rest
    assert not MODEL_CODE.search(source), f"{name}: model or training code: {MODEL_CODE.search(source).group(0)!r}"
    headings = sum(c.cell_type == "markdown" and c.source.lstrip().startswith("#") for c in nb.cells)
    assert headings >= 4


@pytest.fixture(scope="module")
def kernel_spec_dir(tmp_path_factory) -> Path:
    """A kernelspec that starts ipykernel with this interpreter (not whatever "python3" resolves to)."""
    folder = tmp_path_factory.mktemp("kernels")
    (folder / KERNEL_NAME).mkdir()
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "multimodal_lesion tests",
        "language": "python",
    }
    (folder / KERNEL_NAME / "kernel.json").write_text(json.dumps(spec))
    return folder


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One cache for the three notebooks: the synthetic dataset and the embeddings are built once."""
    return tmp_path_factory.mktemp("mmlesion-cache")


def execute(path: Path, workdir: Path, env: dict[str, str], spec_dir: Path) -> tuple[nbformat.NotebookNode, dict]:
    """Run a copy of the notebook (plus a probe cell) in a fresh kernel; raises on the first cell error."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    km = KernelManager(
        kernel_name=KERNEL_NAME,
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec_dir)], ensure_native_kernel=False),
    )
    client = NotebookClient(
        nb, km=km, timeout=TIMEOUT_S, kernel_name=KERNEL_NAME, resources={"metadata": {"path": str(workdir)}}
    )
    client.execute(env=env)
    probe = next(o.text for o in nb.cells[-1].outputs if o.output_type == "stream" and "KERNEL_PROBE" in o.text)
    return nb, json.loads(probe.split("KERNEL_PROBE ", 1)[1])


def output_text(nb: nbformat.NotebookNode) -> str:
    """Stream and text/plain outputs of every cell, joined."""
    parts = []
    for cell in code_cells(nb):
        for out in cell.outputs:
            parts.append(
                out.get("text", "") if out.output_type == "stream" else out.get("data", {}).get("text/plain", "")
            )
    return "\n".join(parts)


def kernel_env(cache: Path, out: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != DATA_ENV}
    env.update(
        MMLESION_CACHE=str(cache),
        MMLESION_NB_OUT=str(out),
        HF_HUB_OFFLINE="1",
        MPLBACKEND="Agg",
        PYTHONWARNINGS="ignore::DeprecationWarning",
        MMLESION_NB_SYNTHETIC_N=os.environ.get(
            "MMLESION_NB_SYNTHETIC_N", "600"
        ),  # the notebooks' 1,000 take 1.6x as long
        **extra,
    )
    return env


def check_run(name: str, nb: nbformat.NotebookNode, probe: dict, out: Path, seconds: float) -> None:
    files, texts = EXPECTED[name]
    assert Path(probe["prefix"]).resolve() == Path(sys.prefix).resolve(), "the kernel ran another Python"
    missing = [f for f in files if not (out / Path(name).stem / f).is_file()]
    assert not missing, f"{name}: did not write {missing}"
    text = output_text(nb)
    for expected in texts:
        assert expected in text, f"{name}: no output line with {expected!r}"
    images = sum("image/png" in o.get("data", {}) for c in code_cells(nb) for o in c.outputs)
    assert images >= 2, f"{name}: shows {images} figures"
    print(f"\n{name}: {seconds:.0f} s wall, kernel CPU {probe['cpu_s']:.0f} s")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs(name: str, tmp_path: Path, shared_cache: Path, kernel_spec_dir: Path):
    out = tmp_path / "out"
    t0 = time.perf_counter()
    nb, probe = execute(NOTEBOOK_DIR / name, tmp_path, kernel_env(shared_cache, out), kernel_spec_dir)
    check_run(name, nb, probe, out, time.perf_counter() - t0)


@pytest.mark.slow
@pytest.mark.real_data
def test_eda_notebook_runs_on_real_data(real_data_root: Path, tmp_path: Path, kernel_spec_dir: Path):
    out = tmp_path / "out"
    env = kernel_env(tmp_path / "cache", out, **{DATA_ENV: str(real_data_root)})
    nb, _ = execute(NOTEBOOK_DIR / "01_eda.ipynb", tmp_path, env, kernel_spec_dir)
    text = output_text(nb)
    assert "real HAM10000: 10,015 images of 7,470 lesions" in text
    assert "1,956 of 7,470 lesions have several images" in text
    assert "lesions in more than one split: 0" in text
