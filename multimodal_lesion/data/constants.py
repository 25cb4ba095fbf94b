"""HAM10000 vocabulary shared by every module: classes, columns and category values."""

from __future__ import annotations

#: Diagnosis codes in the fixed order used for logits, targets and reports.
CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")

#: Full class names for figures and reports.
CLASS_NAMES: dict[str, str] = {
    "akiec": "Actinic keratoses (akiec)",
    "bcc": "Basal cell carcinoma (bcc)",
    "bkl": "Benign keratosis-like lesions (bkl)",
    "df": "Dermatofibroma (df)",
    "mel": "Melanoma (mel)",
    "nv": "Melanocytic nevi (nv)",
    "vasc": "Vascular lesions (vasc)",
}

#: Columns of the official ``HAM10000_metadata.csv``, in order.
METADATA_COLUMNS: tuple[str, ...] = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")

#: The patient features a model may see. ``dx_type`` is deliberately absent: it gives the label away.
PATIENT_FEATURES: tuple[str, ...] = ("age", "sex", "localization")

#: The value HAM10000 uses for a missing sex or localization.
UNKNOWN = "unknown"

SEXES: tuple[str, ...] = ("female", "male")

LOCALIZATIONS: tuple[str, ...] = (
    "abdomen",
    "acral",
    "back",
    "chest",
    "ear",
    "face",
    "foot",
    "genital",
    "hand",
    "lower extremity",
    "neck",
    "scalp",
    "trunk",
    "upper extremity",
)

#: Subfolder name of the lesion masks in the official release.
MASK_DIR = "HAM10000_segmentations_lesion_tschandl"
MASK_SUFFIX = "_segmentation.png"
METADATA_FILE = "HAM10000_metadata.csv"

#: Environment variable naming a real HAM10000 root for real-data tests and benchmarks.
DATA_ENV = "MMLESION_HAM10000"
