"""The layers hold: import-linter's contracts (pyproject.toml) and no private name across subpackages."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "multimodal_lesion"


def _lint_imports() -> list[str]:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.fail("lint-imports not installed: it comes with the test extra (import-linter)")
    return [exe, "--no-cache"]


def test_import_contracts_are_kept() -> None:
    proc = subprocess.run(_lint_imports(), cwd=PACKAGE.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_a_violation_would_be_caught(tmp_path: Path) -> None:
    """The contracts are not vacuous: a copy of the package with training importing report fails them."""
    copy = tmp_path / "multimodal_lesion"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PACKAGE.parent / "pyproject.toml", tmp_path / "pyproject.toml")
    runner = copy / "training" / "runner.py"
    runner.write_text(runner.read_text() + "\nfrom ..report.figures import plot_roc  # noqa\n")
    proc = subprocess.run(
        _lint_imports(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode != 0
    assert "multimodal_lesion.training.runner -> multimodal_lesion.report.figures" in proc.stdout


def _subpackage(module: Path) -> str:
    parts = module.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else module.stem


def _private_imports(path: Path, source: str | None = None) -> list[str]:
    """``from X import _name`` where X is another subpackage of multimodal_lesion (or another top module)."""
    found = []
    home = _subpackage(path)
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if not isinstance(node, ast.ImportFrom) or node.module == "__future__":
            continue
        if node.level:
            base = path.parent.relative_to(PACKAGE.parent).parts[
                : len(path.parent.relative_to(PACKAGE.parent).parts) - node.level + 1
            ]
            target = ".".join(base + tuple((node.module or "").split(".")))
        else:
            target = node.module or ""
        if not target.startswith("multimodal_lesion"):
            continue
        parts = target.split(".")
        other = parts[1] if len(parts) > 1 else ""
        for alias in node.names:
            if alias.name.startswith("_") and not alias.name.startswith("__") and other != home:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {alias.name} from {target}")
    return found


def test_no_private_name_is_imported_across_subpackages() -> None:
    offenders = [hit for path in sorted(PACKAGE.rglob("*.py")) for hit in _private_imports(path)]
    assert offenders == []


def test_the_private_name_check_can_fail() -> None:
    module = PACKAGE / "explain" / "probe.py"  # never written: the source is given
    source = "from ..training.engine import _unwrap\nfrom .gradcam import _helper\n"
    hits = _private_imports(module, source)
    assert len(hits) == 1 and "_unwrap from multimodal_lesion.training.engine" in hits[0]
