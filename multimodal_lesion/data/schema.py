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
    true_tokens: tuple[str, ...] = ("true", "1", "1.0", "yes", "y", "t")
    false_tokens: tuple[str, ...] = ("false", "0", "0.0", "no", "n", "f")
    age: str = ""  # the numeric feature that is the patient's age (0-120; age bands); "" = 'age' or 'age_approx'

    @property
    def names(self) -> tuple[str, ...]:
        """Every feature, in encoding order: numeric, then categorical, then boolean."""
        return (*self.numeric, *self.categorical, *self.boolean)

    @property
    def age_feature(self) -> str:
        """The numeric feature read as an age (range-checked, banded in subgroups); "" when none."""
        if self.age:
            return self.age
        return next((n for n in ("age", "age_approx") if n in self.numeric), "")


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
        split_column: a column that fixes each image's split (``train`` / ``val`` / ``test`` or a fold
            number): used instead of drawing one, and checked for leaks (see ``data/user_splits.py``).
        source_column: a column naming where each image comes from (a clinic, a device, a sub-collection such as
            HAM10000's ``dataset``): never a model input; an external evaluation breaks its scores down by it.
        features: the patient features.
        leak_columns: columns that give the label away; never model inputs (listing one as a feature is an error).
        key_class: the class of the clinical metrics (melanoma by default).
        binary: a key-class-vs-rest task (AUROC, sensitivity at fixed specificity, balanced accuracy).
        mask_dir: folder of lesion masks, relative to the root (empty: none).
        mask_suffix: a mask's file name is ``<image stem><mask_suffix>``, found anywhere below the image root
            (empty: the dataset has no masks).
        columns: the first metadata file's fixed layout (a released file's columns): each one is required (a
            file without it is refused as not shaped like the release), the table keeps them in this order
            (leak columns included, for the data report) and any other column is ignored with a note.
            Empty: the columns the schema names are read, the others noted.
        plain_ids: columns whose values must be plain file stems (letters, digits, '_', '-', '.'; no '/',
            '..' or markup; not empty), checked in this order; without it the image column may hold
            relative paths and an empty group id makes the image its own group.
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
    split_column: str = ""
    source_column: str = ""
    features: Features = field(default_factory=Features)
    leak_columns: tuple[str, ...] = ()
    key_class: str = "mel"
    binary: bool = False
    mask_dir: str = ""
    mask_suffix: str = ""
    columns: tuple[str, ...] = ()
    plain_ids: tuple[str, ...] = ()

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
    def group_noun(self) -> str:
        """What a split group is, in the plural: ``"patients"`` when splits group by patient, else ``"lesions"``."""
        return "patients" if self.group_by == "patient" else "lesions"

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
        duplicate_columns=("from_img", "to_img"),  # the Abhishek et al. 2025 list (data.duplicates)
        features=Features(
            numeric=("age",),
            categorical=("sex", "localization"),
            categories=MappingProxyType({"sex": constants.SEXES, "localization": constants.LOCALIZATIONS}),
            age="age",
            unknown_tokens=("", constants.UNKNOWN),  # the release's own spelling; 'nan', 'na' ... are noted
        ),
        leak_columns=("dx_type",),
        key_class="mel",
        mask_dir=constants.MASK_DIR,
        mask_suffix=constants.MASK_SUFFIX,
        columns=constants.METADATA_COLUMNS,  # the release's 7 columns, in its order; a newer 'dataset' column is noted
        plain_ids=("lesion_id", "image_id"),  # images are found by stem anywhere below the root
    )


@register_schema
def isic2019() -> DatasetSchema:
    """ISIC 2019 training set: one-hot ground truth joined with the metadata on ``image``; 8 classes.

    Codes are the challenge's columns in lower case (``AK`` is ``ak``: see :data:`CLASS_ALIASES` for
    HAM10000's ``akiec``); ``UNK`` has no training image and is not a class. Images without a
    ``lesion_id`` (BCN20000 and MSK rows) are each their own group, with a note.
    """
    classes = ("mel", "nv", "bcc", "ak", "bkl", "df", "vasc", "scc")
    return DatasetSchema(
        name="isic2019",
        metadata=("ISIC_2019_Training_GroundTruth.csv", "ISIC_2019_Training_Metadata.csv"),
        image_column="image",
        label_columns=tuple(c.upper() for c in classes),
        classes=classes,
        class_names=tuple(f"{LONG_NAMES[c]} ({c})" for c in classes),
        group_column="lesion_id",
        features=Features(numeric=("age_approx",), categorical=("anatom_site_general", "sex"), age="age_approx"),
        key_class="mel",
    )


@register_schema
def isic2020() -> DatasetSchema:
    """ISIC 2020 (SIIM-ISIC): melanoma (``target`` 1) vs everything else, split by patient.

    The official duplicates file's pairs are kept in one group; ``diagnosis`` and
    ``benign_malignant`` give the label away and are never inputs.
    """
    return DatasetSchema(
        name="isic2020",
        metadata=("ISIC_2020_Training_GroundTruth.csv",),
        image_column="image_name",
        label_column="target",
        label_map=MappingProxyType({"0": "other", "1": "mel", "0.0": "other", "1.0": "mel"}),
        classes=("other", "mel"),
        class_names=("Other (not melanoma)", "Melanoma (mel)"),
        patient_column="patient_id",
        group_by="patient",
        duplicates="ISIC_2020_Training_Duplicates.csv",
        duplicate_columns=("image_name_1", "image_name_2"),
        features=Features(
            numeric=("age_approx",), categorical=("sex", "anatom_site_general_challenge"), age="age_approx"
        ),
        leak_columns=("diagnosis", "benign_malignant"),
        key_class="mel",
        binary=True,
    )


@register_schema
def pad_ufes_20() -> DatasetSchema:
    """PAD-UFES-20 (smartphone images, Brazil): 6 classes from ``diagnostic``, 21 clinical features.

    Codes are the release's labels in lower case (``ack`` actinic keratosis, ``sek`` seborrheic
    keratosis, ``nev`` nevus). Split by patient (``lesion_id`` repeats across patients);
    ``biopsed`` is 1 for every BCC, MEL and SCC and is never an input.
    """
    classes = ("bcc", "ack", "nev", "sek", "scc", "mel")
    return DatasetSchema(
        name="pad_ufes_20",
        metadata=("metadata.csv",),
        image_column="img_id",
        label_column="diagnostic",
        classes=classes,
        class_names=tuple(f"{LONG_NAMES[c]} ({c})" for c in classes),
        group_column="lesion_id",
        patient_column="patient_id",
        group_by="patient",
        features=Features(
            numeric=("age", "fitspatrick", "diameter_1", "diameter_2"),
            categorical=("region", "gender", "background_father", "background_mother"),
            boolean=(
                "smoke",
                "drink",
                "pesticide",
                "skin_cancer_history",
                "cancer_history",
                "has_piped_water",
                "has_sewage_system",
                "itch",
                "grew",
                "hurt",
                "changed",
                "bleed",
                "elevation",
            ),
            age="age",
        ),
        leak_columns=("biopsed",),
        key_class="mel",
    )


#: Long names of the class codes the presets use.
LONG_NAMES: dict[str, str] = {
    "mel": "Melanoma",
    "nv": "Melanocytic nevus",
    "nev": "Nevus",
    "bcc": "Basal cell carcinoma",
    "ak": "Actinic keratosis",
    "ack": "Actinic keratosis",
    "bkl": "Benign keratosis",
    "sek": "Seborrheic keratosis",
    "df": "Dermatofibroma",
    "vasc": "Vascular lesion",
    "scc": "Squamous cell carcinoma",
}

#: Class codes that name the same diagnosis in different vocabularies (one tuple per diagnosis).
#: HAM10000's ``akiec`` (actinic keratosis / Bowen's disease) meets ISIC 2019's ``ak`` and PAD-UFES-20's
#: ``ack``; ISIC 2019's ``scc`` has no HAM10000 class (part of HAM's ``akiec`` is SCC in ISIC 2019).
#: PAD-UFES-20's ``sek`` (seborrheic keratosis) is one kind of HAM10000's ``bkl``.
CLASS_ALIASES: tuple[tuple[str, ...], ...] = (
    ("mel",),
    ("nv", "nev"),
    ("bcc",),
    ("akiec", "ak", "ack"),
    ("bkl", "sek"),
    ("df",),
    ("vasc",),
    ("scc",),
)


@dataclass(frozen=True)
class ClassMapping:
    """How another dataset's classes land on a run's classes (external validation).

    Attributes:
        mapping: source class code -> the run's class code.
        unmapped: the source classes the run does not know (left out, with a note).
        key_vs_rest: whether the run is scored as its key class vs rest (a binary source).
    """

    mapping: Mapping[str, str]
    unmapped: tuple[str, ...]
    key_vs_rest: bool

    def note(self, source: str, target: str) -> str:
        """One line saying what was mapped and what was left out."""
        pairs = ", ".join(f"{a}->{b}" for a, b in self.mapping.items() if a != b) or "none renamed"
        left = f"; left out (unknown to {target}): {', '.join(self.unmapped)}" if self.unmapped else ""
        how = f"; scored as {target}'s key class vs rest" if self.key_vs_rest else ""
        return f"classes of {source} mapped onto {target}: {pairs}{left}{how}"


def same_class(a: str, b: str) -> bool:
    """Whether two class codes name the same diagnosis (equal, or aliases in :data:`CLASS_ALIASES`)."""
    return a == b or any(a in group and b in group for group in CLASS_ALIASES)


def map_classes(source: DatasetSchema, target: DatasetSchema) -> ClassMapping:
    """Map ``source``'s classes onto ``target``'s (a run's), by code and :data:`CLASS_ALIASES`.

    When ``source`` is binary (key class vs rest), its key class maps to the target's key class and
    its other class to every other target class: the run is scored as key class vs rest
    (``mapping`` then sends the other class to ``"rest"``). Otherwise each source class maps to the
    target class of the same diagnosis; those without one are ``unmapped``.
    """
    if source.binary and not target.binary:
        if not same_class(source.key_class, target.key_class):
            raise ConfigError(
                f"schema {source.name}: key class '{source.key_class}' is not {target.name}'s '{target.key_class}'"
            )
        rest = next(c for c in source.classes if c != source.key_class)
        return ClassMapping(MappingProxyType({source.key_class: target.key_class, rest: "rest"}), (), True)
    mapping: dict[str, str] = {}
    other = [t for t in target.classes if t != target.key_class]
    for code in source.classes:
        match = next((t for t in target.classes if same_class(code, t)), None)
        if target.binary and match is None and len(other) == 1:  # a binary run: every other class is its rest
            match = other[0]
        if match is not None:
            mapping[code] = match
    unmapped = tuple(c for c in source.classes if c not in mapping)
    return ClassMapping(MappingProxyType(mapping), unmapped, False)
