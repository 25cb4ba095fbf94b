"""What a dataset is: its files, label, classes, groups and patient features, as one frozen schema.

Every module downstream of the reader takes the class list, the key class and the patient features
from a :class:`DatasetSchema` (a run stores the resolved one and reloads with it) instead of fixed
HAM10000 constants. The reader turns any schema's files into the same canonical table: ``image_id``,
``dx`` (the class code, one of :attr:`DatasetSchema.classes`), ``lesion_id`` (the split group),
``patient_id`` (when the schema names one), ``path``, ``mask_path`` and the patient features under
their own names.

Presets are registered in :data:`SCHEMAS`; a user's own data needs a short TOML file (see the README).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ..errors import ConfigError
from . import constants


@dataclass(frozen=True)
class Features:
    """The patient features a model may see, by type.

    numeric: standardised, with a missing flag. categorical: one-hot over the training split's
    values plus ``unknown``. boolean: true / false / unknown (``unknown_tokens`` spell the last).
    ``categories`` optionally fixes a categorical feature's vocabulary (values outside it read as
    unknown with a note), as the HAM10000 preset does for sex and localization.
    """

    numeric: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()
    boolean: tuple[str, ...] = ()
    categories: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))
    unknown_tokens: tuple[str, ...] = ("", "unknown", "unk", "nan", "na", "n/a", "none", "null")

    @property
    def names(self) -> tuple[str, ...]:
        """Every feature, in encoding order: numeric, then categorical, then boolean."""
        return (*self.numeric, *self.categorical, *self.boolean)


@dataclass(frozen=True)
class DatasetSchema:
    """How one dataset's files become the canonical table (see the module docstring).

    Attributes:
        name: a short name (runs and external evaluations are named by it).
        metadata: the metadata file(s), relative to the data root, joined on ``image_column``.
        image_column: the image id column: a file stem, a file name or a path relative to ``image_dir``.
        image_dir: where relative image paths start, relative to the image root (default: the root).
        extensions: image file extensions searched for a stem (lower case, with the dot).
        label_column: the label column; empty when ``label_columns`` (one-hot) gives the label.
        label_columns: one-hot label columns, in any order (ISIC 2019's ``MEL, NV, ...``).
        label_map: raw label -> class code (e.g. ``"melanoma" -> "mel"``); unmapped labels must be classes.
        classes: the ordered class codes (logit order).
        class_names: long names for figures, same order as ``classes`` (empty: the codes).
        group_column: the split group (lesion); empty: each image is its own group (with a note).
        patient_column: the patient id, when the data has one (splits may group by it).
        group_by: which id the splits keep together: ``"group"`` (lesion) or ``"patient"``.
        duplicates: a file of image pairs of the same lesion, relative to the root; each pair is kept in one group.
        duplicate_columns: the two image-id columns of ``duplicates``.
        features: the patient features.
        leak_columns: columns that give the label away; never model inputs (listing one as a feature is an error).
        key_class: the class of the clinical metrics (melanoma by default).
        binary: a key-class-vs-rest task (AUROC, sensitivity at fixed specificity, balanced accuracy).
        mask_dir: folder of lesion masks, relative to the root (empty: none).
        mask_suffix: a mask's file name is ``<image stem><mask_suffix>``.
    """

    name: str
    metadata: tuple[str, ...]
    image_column: str
    classes: tuple[str, ...]
    label_column: str = ""
    label_columns: tuple[str, ...] = ()
    label_map: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    class_names: tuple[str, ...] = ()
    image_dir: str = ""
    extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png")
    group_column: str = ""
    patient_column: str = ""
    group_by: str = "group"
    duplicates: str = ""
    duplicate_columns: tuple[str, str] = ("image_1", "image_2")
    features: Features = field(default_factory=Features)
    leak_columns: tuple[str, ...] = ()
    key_class: str = "mel"
    binary: bool = False
    mask_dir: str = ""
    mask_suffix: str = ""

    @property
    def n_classes(self) -> int:
        """How many classes the model's head has."""
        return len(self.classes)

    def class_name(self, code: str) -> str:
        """The long name of a class code (the code itself when none is given)."""
        if self.class_names:
            return self.class_names[self.classes.index(code)]
        return code

    @property
    def key_index(self) -> int:
        """The logit index of :attr:`key_class`."""
        return self.classes.index(self.key_class)


#: Built-in dataset presets by name: ``--schema NAME`` or ``data.schema = "NAME"``.
SCHEMAS: dict[str, Callable[[], DatasetSchema]] = {}


def register_schema(fn: Callable[[], DatasetSchema]) -> Callable[[], DatasetSchema]:
    """Register a preset factory under its function name; a second one with the same name is a bug."""
    if fn.__name__ in SCHEMAS:
        raise ValueError(f"dataset schema '{fn.__name__}' is already registered")
    SCHEMAS[fn.__name__] = fn
    return fn


def preset(name: str) -> DatasetSchema:
    """The built-in schema ``name``; an unknown name is a ConfigError listing the presets."""
    try:
        return SCHEMAS[name]()
    except KeyError:
        raise ConfigError(f"unknown dataset schema '{name}' (presets: {', '.join(sorted(SCHEMAS))})") from None


@register_schema
def ham10000() -> DatasetSchema:
    """HAM10000 as released: 7 classes, lesion groups, age / sex / localization; ``dx_type`` leaks."""
    return DatasetSchema(
        name="ham10000",
        metadata=(constants.METADATA_FILE,),
        image_column="image_id",
        label_column="dx",
        classes=constants.CLASSES,
        class_names=tuple(constants.CLASS_NAMES[c] for c in constants.CLASSES),
        group_column="lesion_id",
        features=Features(
            numeric=("age",),
            categorical=("sex", "localization"),
            categories=MappingProxyType({"sex": constants.SEXES, "localization": constants.LOCALIZATIONS}),
        ),
        leak_columns=("dx_type",),
        key_class="mel",
        mask_dir=constants.MASK_DIR,
        mask_suffix=constants.MASK_SUFFIX,
    )


#: Spellings of one diagnosis across dataset vocabularies (compared lower-cased), by a canonical code.
#: ISIC 2019's ``AK`` and PAD-UFES-20's ``ACK`` are HAM10000's ``akiec``; ``SEK`` / ``SK`` fall under ``bkl``.
CLASS_SYNONYMS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "akiec": ("akiec", "ak", "ack", "actinic keratosis", "actinic keratoses"),
        "bcc": ("bcc", "basal cell carcinoma"),
        "bkl": ("bkl", "sk", "sek", "seborrheic keratosis", "benign keratosis", "lentigo nos", "solar lentigo"),
        "df": ("df", "dermatofibroma"),
        "mel": ("mel", "melanoma"),
        "nv": ("nv", "nev", "nevus", "naevus"),
        "vasc": ("vasc", "vascular lesion"),
        "scc": ("scc", "squamous cell carcinoma"),
    }
)


def canonical_class(code: str) -> str:
    """The canonical code of a class code in any vocabulary (the code itself, lower-cased, when unknown)."""
    text = code.strip().lower()
    return next((key for key, spellings in CLASS_SYNONYMS.items() if text in spellings), text)


def map_classes(source: DatasetSchema, target: DatasetSchema) -> dict[str, str | None]:
    """Each class of ``source`` -> the class of ``target`` with the same meaning, None when it has none."""
    by_meaning = {canonical_class(c): c for c in target.classes}
    return {c: by_meaning.get(canonical_class(c)) for c in source.classes}
