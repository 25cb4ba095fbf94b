"""docs/getting-started.md: its one Python block runs end to end, as a user would paste it.

The block is extracted from the markdown and run in a fresh interpreter inside an empty temporary
folder, so it can rely on the installed package only (CI also runs this from a wheel installed
outside the checkout). The package cache is the session's (``MMLESION_CACHE``), so the synthetic
dataset and the embeddings it needs may already be there.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "getting-started.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


def python_blocks() -> list[str]:
    return BLOCK.findall(PAGE.read_text())


def test_the_page_has_one_python_block_of_about_fifteen_lines_and_the_two_install_commands() -> None:
    text = PAGE.read_text()
    assert 'pip install -e ".[weights]" && mmlesion demo' in text
    assert 'pip install -e ".[test]" && pytest' in text
    (block,) = python_blocks()
    code = [line for line in block.splitlines() if line.strip()]
    assert len(code) <= 18, f"{len(code)} lines"
    assert "import multimodal_lesion as mml" in block
    assert not re.search(r"multimodal_lesion\.\w", block), "the example uses the public API only"
    for call in ("mml.load_config(", "mml.train(", "run.metrics.to_frame()", "run.predict(", "run.explain(n=2"):
        assert call in block
    assert "mml.load_run(" in block and ".evaluate()" in block


@pytest.mark.slow
def test_the_python_block_runs_in_an_empty_folder(tmp_path: Path) -> None:
    (block,) = python_blocks()
    proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "balanced_accuracy" in out and "test" in out and "val" in out
    assert "Prediction(" in out and "sets 0.90" in out
    assert (tmp_path / "runs" / "concat" / "best.pt").is_file()
    assert (tmp_path / "runs" / "concat-report" / "index.html").is_file()
    assert (tmp_path / "runs" / "concat" / "eval" / "test" / "metrics.json").is_file()
    assert "index.html" in out and "image_id" in out  # the report's location and its table of cases
