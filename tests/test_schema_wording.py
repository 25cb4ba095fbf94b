"""A run of a user's own schema speaks that schema's words: no HAM10000 class, feature or mask in its output.

The data is a clinic's own (conftest's :func:`write_tiny_clinic`): classes naevus / melanoma / keratosis,
patients as groups, features sex, location and elevation, no masks. A tiny run is trained and explained
through the real command line; what it prints and the report it writes are read as the user reads them.
"""

from __future__ import annotations

import re
import subprocess

import pytest
from conftest import write_tiny_clinic

from multimodal_lesion.data.constants import CLASSES, PATIENT_FEATURES

#: Every HAM10000 class code but 'mel' (a prefix of the clinic's own 'melanoma', matched as a word anyway).
HAM_WORDS = (*CLASSES, *[f for f in PATIENT_FEATURES if f != "sex"], "contour", "mask", "HAM10000")
#: Python's own warning line: the user must see 'note:' lines instead.
RAW_WARNING = re.compile(r"\S+\.py:\d+: \w*Warning")
#: Embedded figures (base64 text can spell anything).
DATA_URI = re.compile(r"data:image/[a-z]+;base64,[A-Za-z0-9+/=]+")
EXPLAIN = ("explain.faithfulness_cases=0", "explain.randomisation_cases=0", "explain.background_size=16")
EXPLAIN += ("explain.background_resamples=2", "explain.road_percentiles=[]", "explain.prior_masks=0")


@pytest.fixture(scope="module")
def clinic_run(cli, tiny_run_settings: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The clinic's data, a tiny run trained on it, and its explanation report (with each command's output)."""
    root = write_tiny_clinic(tmp_path_factory.mktemp("clinic") / "data")
    run, report = root.parent / "run", root.parent / "report"
    sets = [a for s in tiny_run_settings for a in ("--set", s)]
    train = cli.ok(cli("train", "--data", root, "--schema", root / "schema.toml", *sets, "--out", run))
    explain = cli("explain", "--run", run, "--n", "3", *[a for s in EXPLAIN for a in ("--set", s)], "--out", report)
    return {"root": root, "run": run, "report": report, "train": train, "explain": cli.ok(explain)}


def _words(text: str) -> list[str]:
    """The HAM10000 words in ``text``, matched as whole words, case-insensitively."""
    return [w for w in HAM_WORDS if re.search(rf"(?<![A-Za-z_]){re.escape(w)}(?![A-Za-z_])", text, re.IGNORECASE)]


def _shown(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def test_training_counts_patients_and_prints_no_raw_warning(clinic_run: dict) -> None:
    shown = _shown(clinic_run["train"])
    assert re.search(r"test: .*\(\d+ images, \d+ patients\)", shown), shown
    assert "lesions)" not in shown and not RAW_WARNING.search(shown), shown
    assert not _words(shown), shown


def test_the_report_names_the_schema_s_features_and_no_ham10000_word(clinic_run: dict) -> None:
    pages = [clinic_run["report"] / "index.html", *sorted((clinic_run["report"] / "cases").glob("*.html"))]
    assert len(pages) == 4
    index = DATA_URI.sub("", pages[0].read_text())
    assert "SHAP for the patient features (sex, location, elevation)" in index
    for page in pages:
        text = DATA_URI.sub("", page.read_text())
        assert not _words(text), (page.name, _words(text))
        assert "naevus" in text.lower() or "melanoma" in text.lower() or "keratosis" in text.lower()
    explain = _shown(clinic_run["explain"])
    assert not RAW_WARNING.search(explain) and not _words(explain), explain
