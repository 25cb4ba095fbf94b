"""MetadataEncoder: fitted statistics, explicit unknowns, no label leakage, scikit-learn behaviour."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from multimodal_lesion.data.constants import CLASSES, LOCALIZATIONS, SEXES, UNKNOWN
from multimodal_lesion.data.encoder import MetadataEncoder
from multimodal_lesion.data.ham10000 import read_ham10000
from multimodal_lesion.data.schema import Features
from multimodal_lesion.errors import DataError


def _table(ages: list[float], sexes: list[str], locs: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"age": ages, "sex": sexes, "localization": locs})


@pytest.fixture
def meta(tiny_ham: Path) -> pd.DataFrame:
    return read_ham10000(tiny_ham).metadata


def test_encodes_fixture(meta: pd.DataFrame) -> None:
    enc = MetadataEncoder()
    assert enc.fit(meta) is enc
    X = enc.transform(meta)
    names = list(enc.get_feature_names_out())
    assert X.dtype == np.float32 and X.shape == (len(meta), len(names)) and np.isfinite(X).all()
    assert names[:5] == ["age_z", "age_missing", "sex=female", "sex=male", "sex=unknown"]
    assert names[-1] == "localization=unknown" and "localization=lower extremity" in names
    groups = enc.feature_groups_
    assert list(groups) == ["age", "sex", "localization"]
    assert sorted(i for g in groups.values() for i in g) == list(range(len(names)))
    assert all(names[i].startswith(f"{g}=") for g in ("sex", "localization") for i in groups[g])
    for group in ("sex", "localization"):  # exactly one hot per row in each categorical block
        assert (X[:, groups[group]].sum(axis=1) == 1).all()


def test_age_is_standardised_on_fit_data_only() -> None:
    train = _table([20.0, 40.0, np.nan], ["male"] * 3, ["back"] * 3)
    other = _table([30.0, 80.0, np.nan], ["male"] * 3, ["back"] * 3)
    enc = MetadataEncoder().fit(train)
    assert enc.age_mean_ == 30.0 and enc.age_std_ == 10.0
    X = enc.transform(other)
    assert X[:, 0].tolist() == [0.0, 5.0, 0.0]  # (30-30)/10, (80-30)/10, missing -> 0
    assert X[:, 1].tolist() == [0.0, 0.0, 1.0]  # the missing flag
    assert np.allclose(MetadataEncoder().fit(other).age_mean_, 55.0)


def test_constant_or_absent_age_does_not_divide_by_zero() -> None:
    for ages in ([50.0, 50.0], [np.nan, np.nan]):
        enc = MetadataEncoder().fit(_table(ages, ["male", "female"], ["back", "face"]))
        X = enc.transform(_table([10.0, np.nan], ["male", "female"], ["back", "face"]))
        assert np.isfinite(X).all() and enc.age_std_ == 1.0


def test_categories_seen_in_fit_plus_unknown() -> None:
    enc = MetadataEncoder().fit(_table([1.0, 2.0, 3.0], ["male", "Female ", None], ["face", "back", ""]))
    assert enc.categories_ == {"sex": ["female", "male", UNKNOWN], "localization": ["back", "face", UNKNOWN]}


def test_missing_categories_are_unknown_without_warning() -> None:
    enc = MetadataEncoder().fit(_table([1.0, 2.0], ["male", "female"], ["face", "back"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        X = enc.transform(_table([1.0, 2.0, 3.0], [None, "", UNKNOWN], [np.nan, " ", "UNKNOWN"]))
    names = list(enc.get_feature_names_out())
    assert (X[:, names.index("sex=unknown")] == 1).all()
    assert (X[:, names.index("localization=unknown")] == 1).all()


def test_unseen_category_maps_to_unknown_with_warning() -> None:
    enc = MetadataEncoder().fit(_table([1.0, 2.0], ["male", "female"], ["face", "back"]))
    with pytest.warns(UserWarning, match=r"column 'localization': value\(s\) 'acral' not seen in fit"):
        X = enc.transform(_table([1.0], ["male"], ["acral"]))
    names = list(enc.get_feature_names_out())
    assert X[0, names.index("localization=unknown")] == 1 and X[0, enc.feature_groups_["localization"]].sum() == 1


def test_never_reads_dx_or_dx_type(meta: pd.DataFrame) -> None:
    rng = np.random.default_rng(0)
    leaky = meta.assign(
        dx=rng.permutation(meta.dx.to_numpy()), dx_type=rng.choice(["histo", "follow_up", "confocal"], len(meta))
    )
    plain = meta[["age", "sex", "localization"]]
    enc_plain, enc_leaky = MetadataEncoder().fit(plain), MetadataEncoder().fit(leaky)
    assert list(enc_plain.get_feature_names_out()) == list(enc_leaky.get_feature_names_out())
    assert np.array_equal(enc_plain.transform(plain), enc_leaky.transform(leaky))
    assert np.array_equal(enc_plain.transform(meta), enc_plain.transform(leaky))
    assert not any("dx" in name for name in enc_leaky.get_feature_names_out())


def test_unfitted_encoder_refuses() -> None:
    with pytest.raises(NotFittedError):
        MetadataEncoder().transform(_table([1.0], ["male"], ["back"]))
    with pytest.raises(NotFittedError):
        MetadataEncoder().get_feature_names_out()


def test_bad_tables_name_the_column_or_row() -> None:
    with pytest.raises(DataError, match="missing column\\(s\\) 'localization'"):
        MetadataEncoder().fit(pd.DataFrame({"age": [1.0], "sex": ["male"]}))
    with pytest.raises(DataError, match="empty table"):
        MetadataEncoder().fit(_table([], [], []))
    with pytest.raises(DataError, match="expects a pandas DataFrame"):
        MetadataEncoder().fit(np.zeros((2, 3)))
    bad_age = _table(["40", "forty"], ["male", "male"], ["back", "back"])
    with pytest.raises(DataError, match="row 1, column 'age': 'forty' is not a finite number"):
        MetadataEncoder().fit(bad_age)


def test_scikit_learn_conventions(meta: pd.DataFrame) -> None:
    enc = MetadataEncoder()
    assert enc.get_params() == {"numeric": ("age",), "categorical": ("sex", "localization"), "boolean": ()}
    assert not any(k.endswith("_") for k in vars(enc))
    fitted = clone(enc).fit(meta)
    assert np.array_equal(fitted.transform(meta), MetadataEncoder().fit_transform(meta))
    frame = MetadataEncoder().set_output(transform="pandas").fit(meta).transform(meta)
    assert list(frame.columns) == list(fitted.get_feature_names_out())


@pytest.mark.real_data
def test_real_data_encoding(real_data_root: Path) -> None:
    meta = read_ham10000(real_data_root).metadata
    X = MetadataEncoder().fit(meta).transform(meta)
    assert X.shape == (10015, 2 + 3 + len(LOCALIZATIONS) + 1) and np.isfinite(X).all()
    assert X[:, 1].sum() == 57 and abs(X[:, 0].mean()) < 1e-3  # 57 missing ages; z has mean 0


# --- properties ------------------------------------------------------------------------------------

_SEX = st.sampled_from([*SEXES, UNKNOWN, "", "Male", "other"])
_LOC = st.sampled_from([*LOCALIZATIONS, UNKNOWN, "", "elbow"])
_AGE = st.one_of(st.just(np.nan), st.floats(0, 120, allow_nan=False), st.integers(0, 120).map(float))


@st.composite
def patient_tables(draw: st.DrawFn) -> pd.DataFrame:
    """Any valid patient table, with missing ages, unknowns and odd categories."""
    n = draw(st.integers(1, 40))
    return pd.DataFrame(
        {
            "age": draw(st.lists(_AGE, min_size=n, max_size=n)),
            "sex": draw(st.lists(_SEX, min_size=n, max_size=n)),
            "localization": draw(st.lists(_LOC, min_size=n, max_size=n)),
            "dx": draw(st.lists(st.sampled_from(CLASSES), min_size=n, max_size=n)),
        }
    )


@settings(max_examples=40, deadline=None)
@given(train=patient_tables(), other=patient_tables())
def test_any_valid_table_gives_a_finite_encoding_of_the_right_width(train: pd.DataFrame, other: pd.DataFrame) -> None:
    enc = MetadataEncoder().fit(train)
    width = len(enc.get_feature_names_out())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # unseen categories in ``other`` warn by design
        for table in (train, other):
            X = enc.transform(table)
            assert X.shape == (len(table), width) and X.dtype == np.float32 and np.isfinite(X).all()
            assert (X[:, enc.feature_groups_["sex"]].sum(axis=1) == 1).all()
            assert (X[:, enc.feature_groups_["localization"]].sum(axis=1) == 1).all()
    assert sorted(i for g in enc.feature_groups_.values() for i in g) == list(range(width))


# --- any schema's features ----------------------------------------------------------------------------


def test_an_encoder_json_written_before_schemas_loads_as_ham10000(meta: pd.DataFrame) -> None:
    fitted = MetadataEncoder().fit(meta)
    old = {  # what encoder.json held before schemas: no parameters, age_mean_ / age_std_
        "params": {},
        "learned": {
            "age_mean_": fitted.age_mean_,
            "age_std_": fitted.age_std_,
            "categories_": fitted.categories_,
            "feature_groups_": fitted.feature_groups_,
        },
    }
    loaded = MetadataEncoder.from_json(old)
    assert list(loaded.get_feature_names_out()) == list(fitted.get_feature_names_out())
    assert np.array_equal(loaded.transform(meta), fitted.transform(meta))
    again = MetadataEncoder.from_json(fitted.to_json())
    assert np.array_equal(again.transform(meta), fitted.transform(meta))


def test_numeric_categorical_and_boolean_features_of_a_schema() -> None:
    features = Features(numeric=("age", "diameter"), categorical=("region",), boolean=("itch",))
    train = pd.DataFrame(
        {
            "age": [20.0, 40.0, np.nan],
            "diameter": [1.0, 3.0, 5.0],
            "region": ["arm", "face", "unknown"],
            "itch": ["true", "false", "unknown"],
            "biopsed": ["true", "false", "true"],  # not a feature: never read
        }
    )
    enc = MetadataEncoder.for_features(features).fit(train)
    names = list(enc.get_feature_names_out())
    assert names == [
        "age_z",
        "age_missing",
        "diameter_z",
        "diameter_missing",
        "region=arm",
        "region=face",
        "region=unknown",
        "itch=false",
        "itch=true",
        "itch=unknown",
    ]
    assert enc.feature_groups_ == {"age": [0, 1], "diameter": [2, 3], "region": [4, 5, 6], "itch": [7, 8, 9]}
    X = enc.transform(train)
    assert X[:, 2].tolist() == pytest.approx([-1.2247449, 0.0, 1.2247449])  # (d - 3) / std([1, 3, 5])
    assert X[:, 7:].tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 1]]
    assert np.array_equal(enc.transform(train.assign(biopsed=["x", "y", "z"])), X)
    missing = enc.missing_row()
    assert missing.tolist() == [0, 1, 0, 1, 0, 0, 1, 0, 0, 1]
    assert np.array_equal(enc.blank(X, ["itch"])[:, 7:], np.tile([0, 0, 1], (3, 1)))
    loaded = MetadataEncoder.from_json(enc.to_json())
    assert loaded.boolean == ("itch",) and np.array_equal(loaded.transform(train), X)
