"""Dataset schemas: presets, TOML files (checked key by key), the run folder's schema.toml, class mapping."""

from __future__ import annotations

from pathlib import Path

import pytest

from multimodal_lesion.config import ExperimentConfig, replace
from multimodal_lesion.data.schema import SCHEMAS, map_classes, preset
from multimodal_lesion.data.schema_file import load_schema, resolve_schema, schema_to_toml
from multimodal_lesion.errors import ConfigError, DataError
from multimodal_lesion.runs.folder import RunFolder

MY_CLINIC = """
[dataset]
name = "my_clinic"
metadata = "labels.csv"
image_column = "image"
image_dir = "images"
label_column = "diagnosis"
classes = ["mel", "nev", "bcc", "sk", "misc"]
group_column = "patient"
leak_columns = ["management"]
key_class = "mel"
[dataset.label_map]
"melanoma (in situ)" = "mel"
[features]
numeric = ["age"]
categorical = ["sex", "location"]
boolean = ["itchy"]
"""


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_preset_round_trips_through_its_toml(name: str, tmp_path: Path) -> None:
    schema = preset(name)
    path = tmp_path / "schema.toml"
    path.write_text(schema_to_toml(schema))
    assert load_schema(path) == schema
    assert schema.key_class in schema.classes and len(set(schema.classes)) == len(schema.classes)


def test_the_issue_example_file_reads_with_defaults(tmp_path: Path) -> None:
    path = tmp_path / "clinic.toml"
    path.write_text(MY_CLINIC)
    schema = resolve_schema(str(path))
    assert schema.name == "my_clinic" and schema.metadata == ("labels.csv",)
    assert schema.classes == ("mel", "nev", "bcc", "sk", "misc") and schema.key_index == 0
    assert schema.features.names == ("age", "sex", "location", "itchy")
    assert schema.features.age_feature == "age"
    assert dict(schema.label_map) == {"melanoma (in situ)": "mel"}


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        ('key_class = "mel"', "dataset.key_class"),
        ('group_column = "patient"\ncolour = "red"', "dataset.colour"),
        ("group_column = 3", "dataset.group_column"),
        ('leak_columns = ["itchy"]', "features.boolean"),
        ('group_by = "ward"', "dataset.group_by"),
    ],
)
def test_a_bad_schema_key_is_one_line_naming_the_file_and_key(edit: str, key: str, tmp_path: Path) -> None:
    text = MY_CLINIC
    if edit.startswith("key_class"):
        text = text.replace('key_class = "mel"', 'key_class = "melanoma"')
    elif edit.startswith("group_column"):
        text = text.replace('group_column = "patient"', edit)
    elif edit.startswith("leak_columns"):
        text = text.replace('leak_columns = ["management"]', edit)
    else:
        text = text.replace('key_class = "mel"', 'key_class = "mel"\n' + edit)
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_schema(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and key in message


def test_a_file_extending_a_preset_that_lists_its_leak_as_a_feature_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pad.toml"
    listed = ", ".join(f'"{b}"' for b in (*preset("pad_ufes_20").features.boolean, "biopsed"))
    path.write_text(f'[dataset]\nextends = "pad_ufes_20"\n[features]\nboolean = [{listed}]\n')
    with pytest.raises(ConfigError, match=r"features.boolean: 'biopsed' is a leak column"):
        load_schema(path)


def test_unknown_preset_lists_the_presets() -> None:
    with pytest.raises(ConfigError, match="presets: ham10000, isic2019, isic2020, pad_ufes_20"):
        resolve_schema("isic2018")


def test_run_folder_stores_the_resolved_schema_and_reloads_it(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    folder.prepare()
    assert folder.read_schema() == preset("ham10000")  # a run made before schemas
    schema = preset("isic2019")
    folder.write_schema(schema)
    assert folder.read_schema() == schema
    (folder / "schema.toml").write_text("[dataset]\nname = 3\n")
    with pytest.raises(DataError, match=r"schema.toml: not readable .*dataset.name"):
        folder.read_schema()


def test_duplicates_option_replaces_the_schema_file() -> None:
    cfg = replace(ExperimentConfig(), data={"schema": "ham10000", "duplicates": "/x/pairs.csv"})
    assert resolve_schema(cfg.data.schema, duplicates=cfg.data.duplicates).duplicates == "/x/pairs.csv"


def test_class_mapping_between_vocabularies() -> None:
    dataset, isic19, isic20 = preset("ham10000"), preset("isic2019"), preset("isic2020")
    to_ham = map_classes(isic19, dataset)
    assert to_ham.mapping["ak"] == "akiec" and to_ham.mapping["mel"] == "mel" and to_ham.unmapped == ("scc",)
    binary = map_classes(isic20, dataset)
    assert binary.key_vs_rest and binary.mapping["mel"] == "mel"
    onto_binary = map_classes(dataset, isic20)
    assert onto_binary.mapping["mel"] == "mel" and onto_binary.mapping["nv"] == "other" and not onto_binary.unmapped
    assert map_classes(preset("pad_ufes_20"), dataset).mapping["ack"] == "akiec"
