"""Configs: TOML files and --set overrides fill frozen dataclasses; mistakes name the key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from multimodal_lesion.config import ExperimentConfig, list_presets, load_config, parse_overrides, replace, to_toml
from multimodal_lesion.errors import ConfigError


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_loads_by_name_as_package_data(name: str) -> None:
    """The presets ship inside the package (a wheel has them), named without path or suffix."""
    assert isinstance(load_config(name), ExperimentConfig)
    assert load_config(name, ["train.epochs=2"]).train.epochs == 2


def test_presets_are_package_data_listed_in_setup_cfg() -> None:
    from importlib.resources import files

    root = Path(__file__).parents[1]
    shipped = {p.name for p in files("multimodal_lesion.presets").iterdir() if p.name.endswith(".toml")}
    assert {"real_frozen.toml", "real_partial_cpu.toml", "concat.toml", "ablation.toml"} <= shipped
    assert "multimodal_lesion.presets = *.toml" in (root / "setup.cfg").read_text()
    assert not list((root / "experiments").rglob("*.toml")), "presets live in multimodal_lesion/presets/"


def test_an_unknown_preset_is_one_line_listing_the_presets() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("real_frozn")
    message = str(info.value)
    assert "real_frozn" in message and "real_frozen" in message and "concat" in message and "\n" not in message


def test_a_file_path_still_wins_over_a_preset_name(tmp_path: Path) -> None:
    path = tmp_path / "concat.toml"
    path.write_text('[model]\nname = "film"\n')
    assert load_config(path).model.name == "film"  # a path, not the preset 'concat'
    assert load_config(str(path)).model.name == "film"
    assert load_config("concat").model.name == "concat"


def test_a_mistake_in_an_override_of_a_preset_names_the_pair() -> None:
    with pytest.raises(ConfigError, match=re.escape("--set train.lr=-1")):
        load_config("real_frozen", ["train.lr=-1"])


def test_resolved_config_round_trips_through_toml(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        ['model.name="gated"', "train.lr=0.01", "data.image_size=[96, 128]", "ablation.seeds=[3, 4]", "train.amp=true"],
    )
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg
    assert cfg.model.name == "gated" and cfg.train.lr == 0.01 and cfg.data.image_size == (96, 128)
    assert cfg.ablation.seeds == (3, 4) and cfg.train.amp is True


def test_configs_are_frozen() -> None:
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "text, key",
    [
        ("[train]\nlearning_rate = 0.1\n", "train.learning_rate"),
        ("[trian]\nlr = 0.1\n", "trian"),
        ('[train]\nepochs = "ten"\n', "train.epochs"),
        ("[train]\namp = 1\n", "train.amp"),
        ("[data]\nimage_size = [1, 2, 3]\n", "data.image_size"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        load_config(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("pair", ["train.lr", "lr=0.1", "train.=1", "a.b.c=1", "train.lr=", "train.lr=[1,"])
def test_malformed_set_pair(pair: str) -> None:
    with pytest.raises(ConfigError, match="--set"):
        parse_overrides([pair])


def test_set_bare_string_and_replace_type_checks() -> None:
    cfg = load_config(None, ["model.name=film"])
    assert cfg.model.name == "film"
    with pytest.raises(ConfigError, match=re.escape("train.epochs")):
        replace(cfg, train={"epochs": 2.5})


def test_invalid_toml_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text("[train\nlr=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


SCRIPTS = sorted((Path(__file__).parents[1] / "experiments").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_experiment_scripts_have_usage_and_run_help(script: Path) -> None:
    import ast
    import subprocess
    import sys

    doc = ast.get_docstring(ast.parse(script.read_text()))
    assert doc and "Usage:" in doc
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--data" in proc.stdout


WORD_SETTINGS = [
    ("train", "mode"),
    ("train", "balance"),
    ("train", "augment"),
    ("train", "device"),
    ("explain", "method"),
]


@pytest.mark.parametrize("section,key", WORD_SETTINGS)
def test_settings_that_take_a_word_refuse_any_other_word(section: str, key: str) -> None:
    import typing

    cls = type(getattr(ExperimentConfig(), section))
    choices = typing.get_args(typing.get_type_hints(cls)[key])
    assert len(choices) >= 2  # a Literal, not a plain str
    for word in choices:  # every valid word loads
        assert getattr(getattr(load_config(None, [f'{section}.{key}="{word}"']), section), key) == word
    with pytest.raises(ConfigError) as err:
        load_config(None, [f'{section}.{key}="{choices[0]}x"'])
    message = str(err.value)
    assert f"{section}.{key}" in message and all(repr(c) in message for c in choices)


def test_cam_method_words_are_the_registered_methods() -> None:
    import typing

    from multimodal_lesion.config import CamMethodName
    from multimodal_lesion.explain import CAM_METHODS

    assert set(typing.get_args(CamMethodName)) == set(CAM_METHODS)


def test_cli_refuses_a_mistyped_mode_before_any_work(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "multimodal_lesion.cli", "train", "--set", 'train.mode="frozne"', "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "train.mode" in lines[0] and "'frozen'" in lines[0] and "'end2end'" in lines[0]
    assert not out.exists()


def test_an_old_preset_path_points_to_the_preset_name() -> None:
    with pytest.raises(
        ConfigError, match=re.escape("experiments/configs/real_frozen.toml: config file not found")
    ) as info:
        load_config("experiments/configs/real_frozen.toml")
    assert "'real_frozen'" in str(info.value)
