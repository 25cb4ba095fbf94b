"""A dataset schema as a TOML file: read (checked key by key), written into run folders, resolved by name.

A user's file needs a few keys (see the README's "Dataset schemas"); every key of
:class:`~multimodal_lesion.data.schema.DatasetSchema` may be given. ``extends = "PRESET"`` starts from a
preset and replaces only the keys the file gives. An unknown key, a value of the wrong type or a schema
that contradicts itself (a key class outside the classes, a leak column listed as a feature) is a
one-line ConfigError naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import tomllib

from ..errors import ConfigError
from .schema import SCHEMAS, DatasetSchema, Features, preset

#: ``group_by`` values: keep a lesion's images together, or a patient's.
GROUP_BY = ("group", "patient")
#: Keys that may be a single string instead of a list.
_STRING_OR_LIST = ("metadata",)


def resolve_schema(spec: str, *, duplicates: str = "") -> DatasetSchema:
    """The schema ``spec`` names: a preset (``ham10000``) or a TOML file (``my_clinic.toml``).

    ``duplicates`` (``data.duplicates``) replaces the schema's duplicates file when given.
    """
    if spec.endswith(".toml") or "/" in spec or Path(spec).suffix:
        schema = load_schema(spec)
    else:
        schema = preset(spec or "ham10000")
    return dataclasses.replace(schema, duplicates=duplicates) if duplicates else schema


def load_schema(path: str | Path) -> DatasetSchema:
    """Read and check a schema TOML file; every mistake is a ConfigError naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: schema file not found" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    return schema_from_dict(raw, str(path))


def schema_from_dict(raw: Mapping[str, Any], source: str = "schema") -> DatasetSchema:
    """Build a schema from ``{"dataset": {...}, "features": {...}}``; ``source`` names where it came from."""
    unknown = sorted(set(raw) - {"dataset", "features"})
    if unknown:
        raise ConfigError(f"{source}: unknown section '{unknown[0]}' (valid: dataset, features)")
    dataset = dict(_table(raw, "dataset", source))
    features = dict(_table(raw, "features", source))
    base = _base(dataset.pop("extends", None), source)
    values = {**_values(dataset, DatasetSchema, "dataset", source, skip=("features",))}
    feature_values = _values(features, Features, "features", source)
    if base is None:
        missing = [k for k in ("name", "metadata", "image_column", "classes") if k not in values]
        if missing:
            raise ConfigError(f"{source}: dataset.{missing[0]}: required key missing (or give dataset.extends)")
        schema = DatasetSchema(**values, features=Features(**feature_values))
    else:
        schema = dataclasses.replace(base, **values, features=dataclasses.replace(base.features, **feature_values))
    check_schema(schema, source)
    return schema


def check_schema(schema: DatasetSchema, source: str) -> None:
    """Refuse a schema that contradicts itself, naming ``source`` and the key."""

    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{source}: {key}: {message}")

    classes = schema.classes
    if not classes or len(set(classes)) != len(classes):
        fail("dataset.classes", f"expected a list of distinct class codes, got {list(classes)!r}")
    if schema.key_class not in classes:
        fail("dataset.key_class", f"{schema.key_class!r} is not one of dataset.classes ({', '.join(classes)})")
    if schema.binary and len(classes) != 2:
        fail("dataset.binary", f"a binary task has 2 classes, dataset.classes has {len(classes)}")
    if schema.class_names and len(schema.class_names) != len(classes):
        fail("dataset.class_names", f"{len(schema.class_names)} names for {len(classes)} classes")
    if bool(schema.label_column) == bool(schema.label_columns):
        fail("dataset.label_column", "give exactly one of dataset.label_column and dataset.label_columns (one-hot)")
    bad_map = {k: v for k, v in schema.label_map.items() if v not in classes}
    if bad_map:
        raw, code = next(iter(bad_map.items()))
        fail(f"dataset.label_map.{raw}", f"{code!r} is not one of dataset.classes ({', '.join(classes)})")
    if schema.group_by not in GROUP_BY:
        fail("dataset.group_by", f"expected one of {', '.join(map(repr, GROUP_BY))}, got {schema.group_by!r}")
    if schema.group_by == "patient" and not schema.patient_column:
        fail("dataset.group_by", "'patient' needs dataset.patient_column")
    if not schema.metadata:
        fail("dataset.metadata", "expected at least one metadata file")
    _check_features(schema, fail)


def _check_features(schema: DatasetSchema, fail: Any) -> None:
    """Features: no repeats, never a leak, an id or the label; categories and the age name declared features."""
    f = schema.features
    seen: dict[str, str] = {}
    for kind in ("numeric", "categorical", "boolean"):
        for name in getattr(f, kind):
            if name in seen:
                fail(f"features.{kind}", f"{name!r} is also listed in features.{seen[name]}")
            seen[name] = kind
            if name in schema.leak_columns:
                fail(
                    f"features.{kind}",
                    f"{name!r} is a leak column (dataset.leak_columns: it gives the label away) and can never be "
                    "a model input",
                )
            reserved = {schema.image_column, schema.label_column, *schema.label_columns, schema.group_column}
            if name in reserved - {""} or name in {schema.patient_column} - {""}:
                fail(f"features.{kind}", f"{name!r} is the image id, the label or a group column, not a feature")
    for name in f.categories:
        if name not in f.categorical:
            fail(f"features.categories.{name}", f"{name!r} is not listed in features.categorical")
    if f.age and f.age not in f.numeric:
        fail("features.age", f"{f.age!r} is not listed in features.numeric")


def _table(raw: Mapping[str, Any], name: str, source: str) -> Mapping[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: [{name}] must be a table")
    return value


def _base(name: object, source: str) -> DatasetSchema | None:
    """The preset a file ``extends`` (None when it extends none)."""
    if name is None:
        return None
    if not isinstance(name, str) or name not in SCHEMAS:
        raise ConfigError(f"{source}: dataset.extends: expected a preset ({', '.join(sorted(SCHEMAS))}), got {name!r}")
    return preset(name)


def _values(table: Mapping[str, Any], cls: type, section: str, source: str, skip: tuple[str, ...] = ()) -> dict:
    """The keys of one section, each checked against the dataclass field's type."""
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    out = {}
    for key, value in table.items():
        if key not in valid:
            raise ConfigError(f"{source}: unknown key '{section}.{key}' (valid: {', '.join(valid)})")
        out[key] = _coerce(value, hints[key], f"{section}.{key}", source)
    return out


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """``value`` as type ``tp`` (str, bool, tuples of str, str -> str or str -> list maps); else a ConfigError."""

    def fail(expected: str) -> typing.NoReturn:
        raise ConfigError(f"{source}: {key}: expected {expected}, got {value!r}")

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is str:
        return value if isinstance(value, str) else fail("a string")
    if tp is bool:
        return value if isinstance(value, bool) else fail("true or false")
    if origin is tuple:
        if isinstance(value, str) and key.split(".")[-1] in _STRING_OR_LIST:
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            fail("a list of strings")
        if len(args) == 2 and args[1] is not Ellipsis and len(value) != 2:
            fail("a list of two strings")
        return tuple(value)
    if not isinstance(value, Mapping):
        fail("a table")
    text_values = args[1] is str
    if not all(isinstance(v, str) if text_values else isinstance(v, list) for v in value.values()):
        fail("a table of strings" if text_values else "a table of lists of strings")
    if text_values:
        return MappingProxyType({str(k): v for k, v in value.items()})
    return MappingProxyType({str(k): _coerce(v, tuple[str, ...], f"{key}.{k}", source) for k, v in value.items()})


def schema_to_toml(schema: DatasetSchema) -> str:
    """Every key of ``schema`` as TOML (a run folder's ``schema.toml``); :func:`load_schema` reads it back equal."""
    lines = ["[dataset]"]
    tables: list[str] = []
    for f in dataclasses.fields(schema):
        value = getattr(schema, f.name)
        if f.name == "features":
            continue
        if isinstance(value, Mapping):
            tables += ["", f"[dataset.{f.name}]", *(f"{_toml(k)} = {_toml(v)}" for k, v in value.items())]
        else:
            lines.append(f"{f.name} = {_toml(value)}")
    lines += [*tables, "", "[features]"]
    categories: list[str] = []
    for f in dataclasses.fields(schema.features):
        value = getattr(schema.features, f.name)
        if isinstance(value, Mapping):
            categories += ["", "[features.categories]", *(f"{_toml(k)} = {_toml(v)}" for k, v in value.items())]
        else:
            lines.append(f"{f.name} = {_toml(value)}")
    return "\n".join([*lines, *categories, ""])


def _toml(value: Any) -> str:
    """One TOML value (strings escaped by JSON's rules, which TOML basic strings share)."""
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return "[" + ", ".join(_toml(v) for v in value) + "]"
