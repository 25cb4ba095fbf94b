"""The public API (``import multimodal_lesion as mml``): lazy, typed, and the same numbers as the CLI.

Real tiny runs (timm's test network, 48x64, 2 epochs) on the tiny HAM10000-layout dataset; the CLI
runs in subprocesses for the comparisons.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

import multimodal_lesion as mml

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = Path(__file__).resolve().parents[1]


# --- the package itself ---------------------------------------------------------------------------


def test_importing_the_package_and_loading_a_config_import_no_heavy_library() -> None:
    code = (
        "import sys, multimodal_lesion as mml\n"
        "cfg = mml.load_config('real_frozen', ['train.epochs=3'])\n"
        "assert cfg.train.epochs == 3 and 'concat' in mml.list_presets()\n"
        "print(sorted(m for m in ('torch', 'timm', 'shap', 'pytorch_grad_cam', 'sklearn') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.strip() == "[]"


def test_every_public_name_resolves_and_is_documented() -> None:
    for name in mml.__all__:
        value = getattr(mml, name)
        if callable(value):
            assert (value.__doc__ or "").strip(), f"mml.{name} has no docstring"
    assert set(mml.__all__) <= set(dir(mml))
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        mml.trian  # noqa: B018


def test_list_models_is_the_registry_and_an_unknown_preset_lists_the_presets() -> None:
    assert {"image_only", "metadata_only", "concat", "gated", "film"} <= set(mml.list_models())
    with pytest.raises(mml.ConfigError, match=r"unknown config preset 'real_frozn'.*real_frozen"):
        mml.load_config("real_frozn")


def test_read_dataset_returns_the_canonical_table(tiny_ham: Path) -> None:
    dataset = mml.read_dataset(tiny_ham)
    assert isinstance(dataset, mml.LesionDataset)
    assert {"image_id", "lesion_id", "dx", "age", "sex", "localization", "path"} <= set(dataset.metadata.columns)
    split = mml.split(dataset, seed=0)
    assert split.groupby("lesion_id")["split"].nunique().max() == 1


def test_load_run_of_a_folder_that_is_no_run_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(mml.MMLesionError) as info:
        mml.load_run(tmp_path)
    assert "\n" not in str(info.value)


# --- a trained run ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tiny_ham_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_ham_factory(tmp_path_factory.mktemp("api-data") / "dataset", n_lesions=42)


@pytest.fixture(scope="module")
def run(data: Path, tiny_run_settings: list[str], tmp_path_factory: pytest.TempPathFactory) -> mml.Run:
    cfg = mml.load_config("concat", tiny_run_settings)
    return mml.train(cfg, data, out=tmp_path_factory.mktemp("api-runs") / "concat", show=False)


def test_train_returns_a_run_that_load_run_gives_back_equal(run: mml.Run, data: Path) -> None:
    again = mml.load_run(run.path)
    assert again == run and again.config == run.config and again.schema == run.schema
    assert again.metrics == run.metrics and again.config.data.root == str(data)
    assert again.classes == ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    assert "concat on test_resnet" in repr(again)
    assert sum(p.numel() for p in again.model.parameters()) > 0 and not again.model.training


def test_metrics_to_frame_is_the_headline_of_val_and_test(run: mml.Run) -> None:
    frame = run.metrics.to_frame()
    assert list(frame.index) == ["val", "test"]
    assert {"balanced_accuracy", "macro_auroc", "ece", "n_images", "n_lesions", "balanced_decision_accuracy"} <= set(
        frame.columns
    )
    written = json.loads((run.path / "metrics.json").read_text())
    assert frame.loc["test", "balanced_accuracy"] == written["test"]["calibrated"]["balanced_accuracy"]
    assert frame.loc["test", "n_images"] == len(run.cases("test"))
    assert "val: balanced accuracy" in repr(run.metrics)
    low, high = (frame.loc["test", f"balanced_decision_accuracy_{end}"] for end in ("low", "high"))
    ci = written["test"]["balanced"]["balanced_accuracy_ci"]
    assert (low, high) == (ci["ci_low"], ci["ci_high"]) and low < high
    assert f"[{low:.3f}, {high:.3f}] with the balanced decision" in repr(run.metrics)


@pytest.mark.slow
def test_predict_equals_the_cli_predict(run: mml.Run, cli) -> None:
    case = run.cases("test").dropna(subset=["age"]).iloc[0]
    prediction = run.predict(case.image, age=case.age, sex=case.sex, localization=case.localization)
    args = ["--age", case.age, "--sex", case.sex, "--localization", case.localization]
    for balanced in (False, True):
        flag = ["--balanced"] if balanced else []
        shown = json.loads(cli.ok(cli("predict", "--run", run.path, "--image", case.image, *args, *flag)).stdout)
        mine = prediction.to_json(balanced=balanced)
        mine_shift, shown_shift = mine.pop("shift"), shown.pop("shift")
        # the shift score is a kNN distance over float32 embeddings: equal up to float rounding
        assert mine_shift.pop("shift_score") == pytest.approx(shown_shift.pop("shift_score"), abs=1e-4)
        assert mine == shown and mine_shift == shown_shift
    assert prediction.predicted == max(prediction.probabilities, key=prediction.probabilities.get)
    assert prediction.balanced_decision in run.classes and prediction.tta_spread is not None
    assert sum(prediction.probabilities.values()) == pytest.approx(1, abs=1e-5)
    table = prediction.to_frame()
    assert list(table.index) == list(run.classes) and table["in_set_0.90"].any()
    assert repr(prediction).startswith(f"Prediction({prediction.predicted} p=")


def test_predict_table_takes_the_cases_table_and_agrees_with_predict(run: mml.Run) -> None:
    cases = run.cases("test")
    table = run.predict_table(cases)
    assert list(table["image_id"]) == list(cases["image_id"])
    first = run.predict(cases.image[0], age=cases.age[0], sex=cases.sex[0], localization=cases.localization[0])
    for c in run.classes:
        assert table.loc[0, f"p_{c}"] == pytest.approx(first.probabilities[c], abs=1e-5)
    assert table.loc[0, "balanced_decision"] == first.balanced_decision


def test_evaluate_own_split_and_another_dataset(run: mml.Run, data: Path, tmp_path: Path) -> None:
    own = run.evaluate(split="val")
    assert isinstance(own, mml.Evaluation) and own.split == "val" and own.path.is_file()
    assert own.values["calibrated"]["balanced_accuracy"] == pytest.approx(
        run.metrics["val"]["calibrated"]["balanced_accuracy"], abs=1e-9
    )
    assert list(own.to_frame().index) == ["val"]
    other = tmp_path / "clinic_b"
    _renamed_copy(data, other)
    external = run.evaluate(other)
    assert external.split == "external" and external.path.is_file()
    assert external.values["calibrated"]["n_images"] == len(pd.read_csv(other / "HAM10000_metadata.csv"))
    assert external.path.parent == run.path / "external" / "clinic_b"


def test_explain_writes_the_report_and_returns_it_typed(run: mml.Run, tmp_path: Path) -> None:
    report = run.explain(n=1, out=tmp_path / "report", settings={"faithfulness_cases": 0, "randomisation_cases": 0})
    assert report.index.is_file() and len(report.cases) == 1
    frame = report.to_frame()
    assert len(frame) == 1 and {"shap.age", "shap.sex", "shap.localization", "modality.image"} <= set(frame.columns)
    assert report.shap.values.shape == (1, 3)
    assert report.to_dict()["cases"][0]["image_id"] == frame.image_id[0]
    # the whole split's attributions hold the report's numbers for the report's case
    test = run.attributions("test")
    whole = test.to_frame().set_index("image_id")
    assert len(whole) == len(run.cases("test")) and test.shap.values.shape == (len(whole), 3)
    columns = [c for c in frame.columns if c.startswith(("shap.", "modality."))]
    row = whole.loc[frame.image_id[0], columns].to_numpy(dtype=float)
    assert row == pytest.approx(frame.loc[0, columns].to_numpy(dtype=float), abs=1e-5)


def _renamed_copy(source: Path, dest: Path) -> None:
    """``source`` as a dataset the run never saw: the same images under new image and lesion ids."""
    meta = pd.read_csv(source / "HAM10000_metadata.csv")
    new = {old: f"ISIC_{9_000_000 + k:07d}" for k, old in enumerate(meta.image_id)}
    (dest / "images").mkdir(parents=True)
    for old, name in new.items():
        (dest / "images" / f"{name}.jpg").write_bytes(next(source.rglob(f"{old}.jpg")).read_bytes())
    meta.assign(image_id=meta.image_id.map(new), lesion_id="B" + meta.lesion_id).to_csv(
        dest / "HAM10000_metadata.csv", index=False
    )


# --- notebooks and experiments use the public API only ------------------------------------------------


def _sources() -> list[tuple[str, str]]:
    import nbformat

    found = [(str(p.relative_to(ROOT)), p.read_text()) for p in sorted((ROOT / "experiments").glob("*.py"))]
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        code = "\n".join("\n".join(ln for ln in c.splitlines() if not ln.lstrip().startswith("%")) for c in cells)
        found.append((str(path.relative_to(ROOT)), code))
    return found


@pytest.mark.parametrize("name, source", _sources(), ids=[n for n, _ in _sources()])
def test_notebooks_and_experiments_import_only_the_public_api(name: str, source: str) -> None:
    inner = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("multimodal_lesion."):
            inner.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Import):
            inner += [f"import {a.name}" for a in node.names if a.name.startswith("multimodal_lesion.")]
    assert not inner, f"{name}: {inner} (use `import multimodal_lesion as mml`)"


# --- presets on the command line ----------------------------------------------------------------------


def test_mmlesion_presets_lists_them_and_an_unknown_one_is_exit_2(cli, tmp_path: Path) -> None:
    listed = cli.ok(cli("presets")).stdout.split("\n")
    assert {line.split()[0] for line in listed if line.strip()} == set(mml.list_presets())
    message = cli.error(cli("train", "--config", "real_frozn", "--out", tmp_path / "run"), "train", "real_frozn")
    assert "real_frozen" in message and not (tmp_path / "run").exists()
