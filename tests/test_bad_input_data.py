"""A hurried user's data and ``predict`` inputs, through the real ``mmlesion`` CLI on real files.

Issue items 1 (the reader's notes reach the user from every command), 8 (link loops below the data
root), 9 (the CSV reader: trailing commas, short and long rows, ids written with their extension,
extra columns) and 10 (``predict`` applies the reader's rules). Each case ends either in exit code 2
and one line ``mmlesion COMMAND: error: ...`` naming the file / row / line / field (no traceback), or
in exit code 0 with a ``note:`` line saying what was handled, and nothing lost. docs/bad_input.md
is the table of these cases; keep the two in step.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from multimodal_lesion.data.constants import MASK_DIR, MASK_SUFFIX, METADATA_FILE
from multimodal_lesion.errors import Note


@pytest.fixture(scope="session")
def cli(cli_here):
    """This module's commands run in process (conftest's ``InProcessCli``): most stop on a mistake at once, and a
    new interpreter importing torch for each would cost the suite minutes; ``cli.start`` still starts real
    processes, and ``tests/test_cli_errors.py`` keeps real ones for the console script itself."""
    return cli_here


#: A ~0.4M-parameter timm test network on 48x64 images for one epoch, on one CPU thread: seconds a run.
TINY = [
    arg
    for pair in (
        'model.backbone="test_resnet"',
        'model.weights="none"',
        "data.image_size=[48, 64]",
        "train.epochs=1",
        "train.batch_size=16",
        'train.device="cpu"',
        "train.threads=1",
    )
    for arg in ("--set", pair)
]
#: The smallest ablation: one model, three folds, one seed, in this process.
TINY_ABLATION = [
    arg
    for pair in (
        'ablation.models=["metadata_only"]',
        'ablation.baseline="metadata_only"',
        "ablation.folds=3",
        "ablation.seeds=[0]",
        "ablation.gbm=false",
        "ablation.bootstrap=20",
        "ablation.workers=1",
    )
    for arg in ("--set", pair)
]


# --- helpers ------------------------------------------------------------------------------------------


def read_csv(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / METADATA_FILE, dtype=str, keep_default_na=False)


def write_csv(root: Path, df: pd.DataFrame, **kwargs: object) -> Path:
    path = root / METADATA_FILE
    df.to_csv(path, index=False, **kwargs)
    return path


def csv_lines(root: Path) -> list[str]:
    return (root / METADATA_FILE).read_text().splitlines(keepends=True)


def put_lines(root: Path, lines: list[str]) -> Path:
    path = root / METADATA_FILE
    path.write_text("".join(lines))
    return path


def image_path(root: Path, image_id: str) -> Path:
    return next(root.rglob(f"{image_id}.jpg"))


def split(cli, root: Path, out: Path, *extra: object) -> subprocess.CompletedProcess:
    return cli("split", "--data", root, "--out", out / "splits.csv", *extra)


def table(root: Path, **kwargs: object) -> pd.DataFrame:
    """The table the reader makes of ``root``, in-process (its notes are checked through the CLI)."""
    from multimodal_lesion.data.ham10000 import read_ham10000

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Note)
        return read_ham10000(root, **kwargs).metadata


def notes_in(proc: subprocess.CompletedProcess) -> list[str]:
    """Every ``note:`` the command printed, also one printed behind a progress bar on the same line."""
    return re.findall(r"note: ([^\r\n]*)", proc.stderr)


def assert_notes_once(proc: subprocess.CompletedProcess, expected: list[str]) -> None:
    """Each expected note printed exactly once, as a ``note:`` line (never as a Python warning)."""
    notes = notes_in(proc)
    for needle in expected:
        hits = [n for n in notes if needle in n]
        assert len(hits) == 1, f"{needle!r} printed {len(hits)} times; notes: {notes}"
    assert not re.search(r"\b(Note|UserWarning): .*(MetadataEncoder|HAM10000_metadata)", proc.stderr), proc.stderr


def save_image(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    """A noise RGB image of ``size`` = (W, H)."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


# --- 1. a hurried user's dataset: every tolerated mistake at once; every command tells the user ---------------

#: What the reader must say about :func:`hurried_ham`, whatever the command.
HURRIED_NOTES = [
    "ignored column(s) not used by the package: 'dataset'",
    "column 'sex': 1 row(s) with unrecognised value(s) 'robot' read as 'unknown' (rows 3)",
    "id(s) written with a file extension, matched without it: ISIC_0024311.jpg (rows 6)",
    "broken or looping link(s) (skipped): HAM10000_images_part_2/loop",
    "dropped 1 image(s) listed in HAM10000_metadata.csv not found",
    "1 image(s) found but not listed in HAM10000_metadata.csv (ignored): ISIC_9999999",
]


@pytest.fixture(scope="module")
def hurried_ham(tiny_ham_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny dataset with the newer release's 'dataset' column, a sex 'robot', an id written with
    '.jpg', a listed image missing, an unlisted image and a link loop among the images."""
    root = tiny_ham_factory(tmp_path_factory.mktemp("hurried") / "dataset")
    df = read_csv(root)
    image_path(root, df.image_id[9]).unlink()  # ISIC_0024315: dropped with data.drop_missing
    df.loc[2, "sex"] = "robot"
    df.loc[5, "image_id"] += ".jpg"
    write_csv(root, df.assign(dataset="vidir_modern"))
    shutil.copy(image_path(root, df.image_id[0]), root / "HAM10000_images_part_1" / "ISIC_9999999.jpg")
    (root / "HAM10000_images_part_2" / "loop").symlink_to("loop")
    return root


@pytest.fixture(scope="module")
def hurried_run(
    cli, hurried_ham: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, subprocess.CompletedProcess]:
    """A tiny frozen concat run trained on :func:`hurried_ham` (missing images dropped), and its process."""
    out = tmp_path_factory.mktemp("runs") / "concat"
    proc = cli("train", "--data", hurried_ham, "--out", out, *TINY, "--set", "data.drop_missing=true")
    return out, cli.ok(proc)


@pytest.fixture(scope="module")
def unknown_patient(cli, hurried_run: tuple[Path, subprocess.CompletedProcess], hurried_ham: Path) -> dict[str, float]:
    """What the run predicts for ISIC_0024306 with every patient field left out (unknown)."""
    proc = cli("predict", "--run", hurried_run[0], "--image", image_path(hurried_ham, "ISIC_0024306"))
    return json.loads(cli.ok(proc).stdout)["probabilities"]


@pytest.mark.slow
def test_train_prints_the_reader_notes_and_keeps_every_row(
    hurried_run: tuple[Path, subprocess.CompletedProcess], hurried_ham: Path
) -> None:
    run, proc = hurried_run
    assert_notes_once(proc, HURRIED_NOTES)
    ids = set(pd.read_csv(run / "splits.csv", dtype=str).image_id)
    listed = read_csv(hurried_ham).image_id.str.removesuffix(".jpg")
    assert ids == set(listed) - {"ISIC_0024315"}  # only the missing image is dropped; the '.jpg' id is kept


@pytest.mark.slow
def test_evaluate_prints_the_reader_notes(cli, hurried_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    assert_notes_once(cli.ok(cli("evaluate", "--run", hurried_run[0])), HURRIED_NOTES)


@pytest.mark.slow
def test_explain_prints_the_reader_notes(
    cli, hurried_run: tuple[Path, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    proc = cli.ok(cli("explain", "--run", hurried_run[0], "--n", 1, "--out", tmp_path / "explain"))
    assert_notes_once(proc, HURRIED_NOTES)


@pytest.mark.slow
def test_ablate_prints_the_reader_notes(cli, hurried_ham: Path, tmp_path: Path) -> None:
    settings = [*TINY, *TINY_ABLATION, "--set", "data.drop_missing=true"]
    proc = cli("ablate", "--data", hurried_ham, "--out", tmp_path / "ablation", *settings)
    assert_notes_once(cli.ok(proc), HURRIED_NOTES)


@pytest.mark.slow
def test_demo_prints_the_reader_notes(cli, hurried_ham: Path, tmp_path: Path) -> None:
    settings = [
        "data.drop_missing=true",
        "ablation.bootstrap=20",
        "ablation.workers=1",
        "explain.n_cases=1",
        "explain.faithfulness_cases=1",
        "explain.randomisation_cases=1",
        "explain.background_size=5",
        'explain.target_layer=""',
    ]
    proc = cli(
        "demo", "--data", hurried_ham, "--out", tmp_path / "demo", *TINY, *(a for s in settings for a in ("--set", s))
    )
    assert_notes_once(cli.ok(proc), HURRIED_NOTES)
    # the closing line gives the best fusion model's test balanced accuracy with its lesion-bootstrap interval
    test = json.loads((tmp_path / "demo" / "run" / "metrics.json").read_text())["test"]["calibrated"]
    ci = test["balanced_accuracy_ci"]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("best fusion model:"))
    assert f"test balanced accuracy {test['balanced_accuracy']:.3f} [{ci['ci_low']:.3f}, {ci['ci_high']:.3f}]," in line


@pytest.mark.slow
def test_category_unseen_in_training_is_a_note(
    cli,
    hurried_run: tuple[Path, subprocess.CompletedProcess],
    hurried_ham: Path,
    unknown_patient: dict[str, float],
    tmp_path: Path,
) -> None:
    """The encoder's 'not seen in fit' is the package's note, on evaluate and on predict alike."""
    run = hurried_run[0]
    data = shutil.copytree(hurried_ham, tmp_path / "dataset", symlinks=True)
    splits = pd.read_csv(run / "splits.csv", dtype=str)
    test_id = splits.loc[splits.split == "test", "image_id"].iloc[0]
    df = read_csv(data)
    df.loc[df.image_id == test_id, "localization"] = "acral"  # valid, but no training image has it
    write_csv(data, df)
    expected = "MetadataEncoder: column 'localization': value(s) 'acral' not seen in fit; encoded as 'unknown'"
    assert_notes_once(cli.ok(cli("evaluate", "--run", run, "--data", data)), [expected])

    image = image_path(hurried_ham, "ISIC_0024306")
    acral = cli.ok(cli("predict", "--run", run, "--image", image, "--localization", "acral"))
    assert_notes_once(acral, [expected])
    assert json.loads(acral.stdout)["probabilities"] == unknown_patient  # encoded exactly as unknown


# --- 8. the folder scan: links that loop or lead nowhere are skipped, and said --------------------------------


def _loop_to_itself(root: Path) -> str:
    (root / "HAM10000_images_part_1" / "loop").symlink_to("loop")
    return "HAM10000_images_part_1/loop"


def _loop_of_two(root: Path) -> str:
    (root / "a").symlink_to("b")
    (root / "b").symlink_to("a")
    return "a (Too many levels of symbolic links), b"


def _loop_named_like_an_image(root: Path) -> str:
    (root / "HAM10000_images_part_2" / "ISIC_7777777.jpg").symlink_to("ISIC_7777777.jpg")
    return "HAM10000_images_part_2/ISIC_7777777.jpg"


def _dangling_link(root: Path) -> str:
    (root / "HAM10000_images_part_1" / "ISIC_8888888.jpg").symlink_to("../moved/ISIC_8888888.jpg")
    return "HAM10000_images_part_1/ISIC_8888888.jpg (No such file or directory)"


@pytest.mark.parametrize("make", [_loop_to_itself, _loop_of_two, _loop_named_like_an_image, _dangling_link])
def test_link_loops_and_dangling_links_are_skipped_with_a_note(
    cli, tiny_ham: Path, tmp_path: Path, make: Callable[[Path], str]
) -> None:
    before = table(tiny_ham)
    named = make(tiny_ham)
    proc = cli.ok(split(cli, tiny_ham, tmp_path))
    (note,) = cli.notes(proc)
    assert "broken or looping link(s) (skipped)" in note and named in note, note
    pd.testing.assert_frame_equal(table(tiny_ham), before)
    assert len(pd.read_csv(tmp_path / "splits.csv")) == len(before)


def test_link_to_a_parent_folder_is_not_followed(cli, tiny_ham: Path, tmp_path: Path) -> None:
    (tiny_ham / "HAM10000_images_part_1" / "up").symlink_to("..", target_is_directory=True)
    proc = cli.ok(split(cli, tiny_ham, tmp_path))
    assert cli.notes(proc) == ["note: ignored 1 linked folder(s) (not followed): HAM10000_images_part_1/up"]


def test_listed_image_that_is_a_broken_link_is_named(cli, tiny_ham: Path, tmp_path: Path) -> None:
    path = image_path(tiny_ham, "ISIC_0024310")
    path.unlink()
    path.symlink_to(path.name)  # loops
    cli.error(split(cli, tiny_ham, tmp_path), "split", "ISIC_0024310", "not found", "1 of them broken link(s)")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every folder: an unreadable folder cannot be made")
def test_unreadable_sub_folder_is_skipped_with_a_note(cli, tiny_ham: Path, tmp_path: Path) -> None:
    locked = tiny_ham / "lost+found"
    locked.mkdir(mode=0)
    try:
        proc = cli.ok(split(cli, tiny_ham, tmp_path))
    finally:
        locked.chmod(0o700)
    assert any("unreadable folder(s) (skipped): lost+found" in n for n in cli.notes(proc))


# --- the data root ------------------------------------------------------------------------------------------


def test_data_root_mistakes_are_named(cli, tiny_ham: Path, tmp_path: Path) -> None:
    images = tiny_ham / "HAM10000_images_part_1"
    csv_file = tiny_ham / METADATA_FILE
    cli.error(split(cli, images, tmp_path), "split", "metadata file not found", "give that folder as the data root")
    cli.error(split(cli, csv_file, tmp_path), "split", str(csv_file), "data root is not a folder (it is a file")
    csv_file.rename(tiny_ham / "metadata.csv")
    cli.error(split(cli, tiny_ham, tmp_path), "split", "found metadata.csv", f"rename it to {METADATA_FILE}")


def test_images_still_zipped_are_named(cli, tiny_ham: Path, tmp_path: Path) -> None:
    for part in ("HAM10000_images_part_1", "HAM10000_images_part_2"):
        shutil.make_archive(str(tiny_ham / part), "zip", tiny_ham / part)
        shutil.rmtree(tiny_ham / part)
    cli.error(split(cli, tiny_ham, tmp_path), "split", "not found", "HAM10000_images_part_1.zip", "unpack them")


# --- 9. the CSV: what a spreadsheet or a script writes is read, or refused by row and line ---------------------


def _trailing_comma_on_rows(root: Path) -> None:
    lines = csv_lines(root)
    put_lines(root, [lines[0]] + [line.rstrip("\n") + ",\n" for line in lines[1:]])


def _trailing_comma_on_every_line(root: Path) -> None:
    put_lines(root, [line.rstrip("\n") + ",\n" for line in csv_lines(root)])


def _trailing_comma_on_header(root: Path) -> None:
    lines = csv_lines(root)
    put_lines(root, [lines[0].rstrip("\n") + ",\n", *lines[1:]])


def _empty_rows_at_the_end(root: Path) -> None:
    put_lines(root, [*csv_lines(root), ",,,,,,\n", ",,,,,,\n", ",,,,,,\n"])


def _blank_lines(root: Path) -> None:
    lines = csv_lines(root)
    put_lines(root, [*lines[:3], "\n", "\n", *lines[3:]])


#: A CSV written differently but meaning the same table -> (rewrite, the note it gets or None).
SAME_TABLE: dict[str, tuple[Callable[[Path], object], str | None]] = {
    "trailing comma on every row": (_trailing_comma_on_rows, "every row ends with 1 empty field(s)"),
    "trailing comma on every line": (_trailing_comma_on_every_line, "column 8 (no name, empty"),
    "trailing comma on the header": (_trailing_comma_on_header, "column 8 (no name, empty"),
    "newer release's 'dataset' column": (
        lambda root: write_csv(root, read_csv(root).assign(dataset="vidir_modern")),
        "ignored column(s) not used by the package: 'dataset'",
    ),
    "several extra columns": (
        lambda root: write_csv(root, read_csv(root).assign(notes="x", site="Vienna")),
        "ignored column(s) not used by the package: 'notes', 'site'",
    ),
    "saved with pandas' row index": (
        lambda root: read_csv(root).to_csv(root / METADATA_FILE),
        "column 1 (no name: a saved row index?)",
    ),
    "';'-separated": (lambda root: write_csv(root, read_csv(root), sep=";"), "read as ';'-separated"),
    "tab-separated": (lambda root: write_csv(root, read_csv(root), sep="\t"), "read as tab-separated"),
    "empty rows left by a spreadsheet": (_empty_rows_at_the_end, "skipped 3 row(s) of empty fields"),
    "blank lines": (_blank_lines, None),
    "CRLF line endings": (
        lambda root: (root / METADATA_FILE).write_bytes((root / METADATA_FILE).read_bytes().replace(b"\n", b"\r\n")),
        None,
    ),
    "every field quoted": (lambda root: write_csv(root, read_csv(root), quoting=csv.QUOTE_ALL), None),
    "spaces after the commas": (lambda root: put_lines(root, [x.replace(",", ", ") for x in csv_lines(root)]), None),
}


@pytest.mark.parametrize("case", SAME_TABLE)
def test_csv_written_differently_reads_the_same_table(cli, tiny_ham: Path, tmp_path: Path, case: str) -> None:
    rewrite, expected = SAME_TABLE[case]
    before = table(tiny_ham)
    rewrite(tiny_ham)
    proc = cli.ok(split(cli, tiny_ham, tmp_path))
    notes = cli.notes(proc)
    if expected is None:
        assert notes == []
    else:
        assert len(notes) == 1 and expected in notes[0] and METADATA_FILE in notes[0], notes
    pd.testing.assert_frame_equal(table(tiny_ham), before)  # nothing lost, nothing shifted
    assert sorted(pd.read_csv(tmp_path / "splits.csv", dtype=str).image_id) == sorted(before.image_id)


def _short_row(root: Path) -> None:
    put_lines(root, [x.rsplit(",", 1)[0] + "\n" if i == 4 else x for i, x in enumerate(csv_lines(root))])


def _long_row(root: Path) -> None:  # 'lower, extremity' written without quotes
    put_lines(root, [x.rstrip("\n") + ",extremity\n" if i == 4 else x for i, x in enumerate(csv_lines(root))])


def _stray_trailing_comma(root: Path) -> None:
    put_lines(root, [x.rstrip("\n") + ",\n" if i == 4 else x for i, x in enumerate(csv_lines(root))])


def _bad_dx_after_blank_lines(root: Path) -> None:
    lines = csv_lines(root)
    lines[4] = lines[4].replace(",bkl,", ",melanoma,")
    put_lines(root, [*lines[:2], "\n", *lines[2:]])


def _latin1(root: Path) -> None:
    path = root / METADATA_FILE
    lines = path.read_bytes().split(b"\n")
    lines[6] = lines[6].replace(b"histo", b"hist\xf6")
    path.write_bytes(b"\n".join(lines))


def _nul_byte(root: Path) -> None:
    path = root / METADATA_FILE
    lines = path.read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b"histo", b"his\x00to")
    path.write_bytes(b"\n".join(lines))


def _unterminated_quote(root: Path) -> None:
    put_lines(root, [x.replace(",histo,", ',"histo,') if i == 7 else x for i, x in enumerate(csv_lines(root))])


def _repeated_column(root: Path) -> None:
    lines = csv_lines(root)
    put_lines(root, [lines[0].rstrip("\n") + ",age\n"] + [x.rstrip("\n") + ",40\n" for x in lines[1:]])


def _extra_but_missing(root: Path) -> None:
    write_csv(root, read_csv(root).drop(columns="age").assign(dataset="vidir_modern"))


def _id_with_and_without_extension(root: Path) -> None:
    df = read_csv(root)
    df.loc[4, "image_id"] = df.loc[3, "image_id"] + ".jpg"
    write_csv(root, df)


def _set_age(value: str) -> Callable[[Path], None]:
    def rewrite(root: Path) -> None:
        df = read_csv(root)
        df.loc[3, "age"] = value
        write_csv(root, df)

    return rewrite


#: A CSV that cannot be read as meant -> (rewrite, what the one error line must name).
REFUSED: dict[str, tuple[Callable[[Path], object], list[str]]] = {
    "short row": (_short_row, ["row 4 (line 5) has 6 field(s) but the header has 7", "a value missing"]),
    "long row": (_long_row, ["row 4 (line 5) has 8 field(s) but the header has 7", "unquoted ','"]),
    "one row with a trailing comma": (_stray_trailing_comma, ["row 4 (line 5) has 8 field(s)", "stray trailing comma"]),
    "bad row after a blank line": (_bad_dx_after_blank_lines, ["row 4 (line 6), column 'dx'", "'melanoma'"]),
    "not UTF-8": (_latin1, ["not a readable CSV: line 7", "'utf-8' codec can't decode byte 0xf6", "save it as UTF-8"]),
    "NUL byte": (_nul_byte, ["not a readable CSV: line 4 contains a NUL byte"]),
    "unterminated quote": (_unterminated_quote, ["not a readable CSV: line", "unexpected end of data"]),
    "repeated column": (_repeated_column, ["column 'age' appears more than once (columns 5, 8)"]),
    "extra column but one missing": (_extra_but_missing, ["missing column(s) 'age'", "unexpected column(s) 'dataset'"]),
    "upper-case header": (
        lambda root: put_lines(root, [csv_lines(root)[0].upper(), *csv_lines(root)[1:]]),
        ["missing column(s) 'lesion_id'", "unexpected column(s) 'LESION_ID'"],
    ),
    "id listed with and without extension": (
        _id_with_and_without_extension,
        ["duplicated id(s) once the file extension is removed: ISIC_0024309 (rows 4, 5)"],
    ),
    "age with underscores": (_set_age("1_0"), ["row 4 (line 5), column 'age'", "'1_0' is not an age"]),
    "age in hex": (_set_age("0x10"), ["row 4 (line 5), column 'age'", "'0x10' is not an age"]),
    "age with words": (_set_age("45 years"), ["row 4 (line 5), column 'age'", "'45 years' is not an age"]),
    "age with a decimal comma": (_set_age("45,5"), ["row 4 (line 5), column 'age'", "'45,5' is not an age"]),
}


@pytest.mark.parametrize("case", REFUSED)
def test_csv_that_cannot_be_read_as_meant_is_refused_by_line(cli, tiny_ham: Path, tmp_path: Path, case: str) -> None:
    rewrite, needles = REFUSED[case]
    rewrite(tiny_ham)
    cli.error(split(cli, tiny_ham, tmp_path), "split", str(tiny_ham / METADATA_FILE), *needles)
    assert not (tmp_path / "splits.csv").exists()


@pytest.mark.parametrize("suffix", [".jpg", ".JPG", ".png"])
def test_image_id_written_with_its_extension_matches_the_file(cli, tiny_ham: Path, tmp_path: Path, suffix: str) -> None:
    before = table(tiny_ham)
    df = read_csv(tiny_ham)
    df.loc[3, "image_id"] += suffix
    write_csv(tiny_ham, df)
    proc = cli.ok(split(cli, tiny_ham, tmp_path))
    (note,) = cli.notes(proc)
    assert f"1 id(s) written with a file extension, matched without it: ISIC_0024309{suffix} (rows 4)" in note
    pd.testing.assert_frame_equal(table(tiny_ham), before)
    assert "ISIC_0024309" in set(pd.read_csv(tmp_path / "splits.csv", dtype=str).image_id)


def test_every_image_id_with_its_extension(cli, tiny_ham: Path, tmp_path: Path) -> None:
    before = table(tiny_ham)
    write_csv(tiny_ham, read_csv(tiny_ham).assign(image_id=lambda df: df.image_id + ".jpg"))
    proc = cli.ok(split(cli, tiny_ham, tmp_path))
    (note,) = cli.notes(proc)
    assert f"{len(before)} id(s) written with a file extension" in note
    pd.testing.assert_frame_equal(table(tiny_ham), before)


@pytest.mark.parametrize(("column", "value", "read"), [("sex", " MALE ", "male"), ("localization", "Back", "back")])
def test_case_and_spaces_of_categories_are_normalised_silently(
    cli, tiny_ham: Path, tmp_path: Path, column: str, value: str, read: str
) -> None:
    df = read_csv(tiny_ham)
    df.loc[3, column] = value
    write_csv(tiny_ham, df)
    assert cli.notes(cli.ok(split(cli, tiny_ham, tmp_path))) == []
    assert table(tiny_ham).loc[3, column] == read


# --- 10. predict: the reader's rules for the patient fields and the image ------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("value", ["-3", "121", "1e9", "nan", "inf"])
def test_predict_refuses_an_age_the_csv_would_refuse(
    cli, hurried_run: tuple[Path, subprocess.CompletedProcess], hurried_ham: Path, value: str
) -> None:
    image = image_path(hurried_ham, "ISIC_0024306")
    proc = cli("predict", "--run", hurried_run[0], "--image", image, "--age", value)
    cli.error(proc, "predict", "age", repr(value) if value != "1e9" else "'1e", "120")
    assert proc.stdout == ""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("value", "shown"),
    [(-3.0, "-3"), (121, "121"), (1e9, "1e+09"), (float("nan"), "nan"), ("inf", "inf"), ("1_0", "1_0")],
)
def test_predict_image_applies_the_reader_s_age_rule(
    hurried_run: tuple[Path, subprocess.CompletedProcess], hurried_ham: Path, value: object, shown: str
) -> None:
    """The library call itself, with what an older CLI or a notebook passes (numbers) or a string option.

    The rule is the CSV's (``parse_age``): no ``nan`` / ``inf``, no '1_0' that Python's float() would take.
    """
    from multimodal_lesion.errors import DataError
    from multimodal_lesion.runs import predict_image

    image = image_path(hurried_ham, "ISIC_0024306")
    rule = "is not an age (a number from 0 to 120; leave it out when unknown)"
    with pytest.raises(DataError, match=re.escape(f"age: '{shown}' {rule}")):
        predict_image(hurried_run[0], image, age=value)


@pytest.mark.slow
@pytest.mark.parametrize("value", ["0", "120"])
def test_predict_takes_every_age_the_csv_takes(
    cli, hurried_run: tuple[Path, subprocess.CompletedProcess], hurried_ham: Path, value: str
) -> None:
    image = image_path(hurried_ham, "ISIC_0024306")
    proc = cli.ok(cli("predict", "--run", hurried_run[0], "--image", image, "--age", value))
    assert cli.notes(proc) == [] and abs(sum(json.loads(proc.stdout)["probabilities"].values()) - 1) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize(
    ("option", "value"), [("--sex", "robot"), ("--sex", "M"), ("--localization", "lower_extremity")]
)
def test_predict_reads_an_unrecognised_category_as_unknown_with_a_note(
    cli,
    hurried_run: tuple[Path, subprocess.CompletedProcess],
    hurried_ham: Path,
    unknown_patient: dict[str, float],
    option: str,
    value: str,
) -> None:
    run, image = hurried_run[0], image_path(hurried_ham, "ISIC_0024306")
    proc = cli.ok(cli("predict", "--run", run, "--image", image, option, value))
    field = option.removeprefix("--")
    assert cli.notes(proc) == [
        f"note: {field}: unrecognised value {value!r} read as 'unknown' (known: "
        + (
            "female, male)"
            if field == "sex"
            else "abdomen, acral, back, chest, ear, face, foot, genital, hand, "
            "lower extremity, neck, scalp, trunk, upper extremity)"
        )
    ]
    assert "Warning" not in proc.stderr
    assert json.loads(proc.stdout)["probabilities"] == unknown_patient  # encoded exactly as unknown


@pytest.mark.slow
@pytest.mark.parametrize("size", [(1, 1), (15, 200)])
def test_predict_refuses_an_image_too_small_to_be_dermoscopy(
    cli, hurried_run: tuple[Path, subprocess.CompletedProcess], tmp_path: Path, size: tuple[int, int]
) -> None:
    image = save_image(tmp_path / "thumb.png", size)
    proc = cli("predict", "--run", hurried_run[0], "--image", image)
    cli.error(proc, "predict", str(image), f"image is {size[0]}x{size[1]} pixels", "16-pixel minimum side")


@pytest.mark.slow
def test_predict_takes_an_image_of_the_minimum_side(
    cli, hurried_run: tuple[Path, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    proc = cli.ok(cli("predict", "--run", hurried_run[0], "--image", save_image(tmp_path / "small.png", (16, 16))))
    assert len(json.loads(proc.stdout)["probabilities"]) == 7


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["empty file", "folder", "missing"])
def test_predict_names_an_image_that_is_not_one(
    cli, hurried_run: tuple[Path, subprocess.CompletedProcess], tmp_path: Path, kind: str
) -> None:
    image = tmp_path / "case.jpg"
    words = {"empty file": "image file is empty (0 bytes)", "folder": "is a folder", "missing": "image file not found"}
    if kind == "empty file":
        image.write_bytes(b"")
    elif kind == "folder":
        image.mkdir()
    cli.error(cli("predict", "--run", hurried_run[0], "--image", image), "predict", str(image), words[kind])


@pytest.mark.slow
def test_predict_with_a_model_that_ignores_the_image_says_so_and_still_checks_it(
    cli, hurried_ham: Path, tmp_path: Path
) -> None:
    run = tmp_path / "metadata_only"
    settings = [*TINY, "--set", "data.drop_missing=true", "--set", 'model.name="metadata_only"']
    cli.ok(cli("train", "--data", hurried_ham, "--out", run, *settings))
    proc = cli.ok(cli("predict", "--run", run, "--image", image_path(hurried_ham, "ISIC_0024306"), "--age", 40))
    assert cli.notes(proc) == [
        "note: model 'metadata_only' does not look at the image: its prediction comes from the patient fields"
    ]
    missing = tmp_path / "typo.jpg"
    cli.error(cli("predict", "--run", run, "--image", missing), "predict", str(missing), "image file not found")


@pytest.mark.slow
def test_training_refuses_a_tiny_image_in_the_dataset(cli, tiny_ham: Path, tmp_path: Path) -> None:
    """The same rule as predict's, in the data layer: the image cache refuses the file by name."""
    path = image_path(tiny_ham, "ISIC_0024312")
    save_image(path.with_suffix(".png"), (8, 6))
    path.unlink()
    tiny = path.with_suffix(".png")
    proc = cli("train", "--data", tiny_ham, "--out", tmp_path / "run", *TINY)
    cli.error(proc, "train", str(tiny), "image is 8x6 pixels", "16-pixel minimum side")


# --- masks: read as meant when binary, and said how when not ------------------------------------------------


@pytest.mark.slow
def test_masks_that_are_not_binary_are_noted_and_0_1_masks_read_as_binary(
    cli, hurried_run: tuple[Path, subprocess.CompletedProcess], hurried_ham: Path, tmp_path: Path
) -> None:
    from multimodal_lesion.data.images import load_mask

    run = hurried_run[0]
    data = shutil.copytree(hurried_ham, tmp_path / "dataset", symlinks=True)
    splits = pd.read_csv(run / "splits.csv", dtype=str)
    soft_id, binary_id = splits.loc[splits.split == "test", "image_id"].iloc[:2]
    soft, binary = (data / MASK_DIR / f"{i}{MASK_SUFFIX}" for i in (soft_id, binary_id))
    official = load_mask(binary)
    Image.fromarray(official.astype(np.uint8)).save(binary)  # the same mask written 0/1
    ramp = np.tile(np.linspace(0, 255, 200).astype(np.uint8), (150, 1))  # anti-aliased: every grey level
    Image.fromarray(ramp).save(soft)

    proc = cli("explain", "--run", run, "--data", data, "--cases", soft_id, binary_id, "--out", tmp_path / "explain")
    mask_notes = [n for n in notes_in(cli.ok(proc)) if "not a binary mask" in n]
    assert mask_notes == [
        f"{soft}: not a binary mask (200 grey levels from 0 to 255, expected 0/255 or 0/1); "
        "read as lesion where the value is >= 128 (50% of pixels)"
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error", Note)  # a 0/1 mask is binary: no note, and not read as empty
        assert (load_mask(binary) == official).all() and official.any()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "file is empty (expected a header with an 'image' column and one row per case)"),
        ("image,age,sex,localization\n", "has a header but no rows (expected one row per case)"),
    ],
)
def test_predict_names_an_empty_csv_of_cases(
    cli, hurried_run: tuple[Path, subprocess.CompletedProcess], tmp_path: Path, content: str, message: str
) -> None:
    """It said 'MetadataEncoder: empty table (no rows)', naming neither the file nor what it lacks."""
    csv = tmp_path / "cases.csv"
    csv.write_text(content)
    out = tmp_path / "out.csv"
    proc = cli("predict", "--run", hurried_run[0], "--csv", csv, "--out", out)
    cli.error(proc, "predict", f"{csv}: {message}")
    assert "MetadataEncoder" not in proc.stderr and not out.exists()
