"""How far new images sit from a run's training images: a per-image alarm and a dataset-level test.

- **Per image** (:class:`ShiftReference`): the distance from an image's embedding to its ``k``-th
  nearest training image (Sun et al. 2022, deep nearest neighbours), in the run's own embedding space
  (the pooled image embedding the head reads: frozen runs' flip-averaged one, partial and end-to-end
  runs' after the fine-tuned tail), on unit-length embeddings. The score becomes a conformal p-value
  against the validation images' scores: ``p = (1 + #{val scores >= s}) / (1 + n_val)``. For an image
  exchangeable with the validation images, ``P(p <= level) <= level``: flagging ``p <= level`` raises a
  false alarm on at most that share of images like the run's own (a level below ``1 / (n_val + 1)``
  never fires).
  The run's test images are scored too: their flag rate is the alarm's false-alarm rate on images
  like the run's, and the score's AUROC for telling new images from them says how far apart they sit.
- **Per dataset** (:func:`mmd_test`): the maximum mean discrepancy between the new images' embeddings
  and the held-out validation images' (Gaussian kernel, median-distance bandwidth) with a permutation
  p-value (Gretton et al. 2012).

The reference (training and validation embeddings, the validation and test images' scores) is computed once from the
run's data and kept in the run folder as ``shift_reference.npz``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MMLesionError, note
from ..io import atomic_write

#: Neighbours of the kNN distance (the k-th training neighbour's distance is the score).
K_NEIGHBOURS = 10
#: Default level of the per-image alarm: at most this share of images like the run's are flagged.
DEFAULT_LEVEL = 0.01
#: The run-folder file that keeps the reference.
REFERENCE_FILE = "shift_reference.npz"
#: Images per side of the dataset-level test (a random subset beyond it) and its permutations.
MMD_MAX_N, MMD_PERMUTATIONS = 500, 500
REFERENCE_VERSION = 1


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """Embeddings (N, F) scaled to unit length (float32); an all-zero row stays zero."""
    x = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def knn_distance(reference: np.ndarray, queries: np.ndarray, k: int, exclude_self: bool = False) -> np.ndarray:
    """The distance of each query (unit rows) to its ``k``-th nearest row of ``reference`` (scikit-learn).

    ``exclude_self``: the queries are the reference itself; each row's own zero distance is skipped.
    """
    from sklearn.neighbors import NearestNeighbors

    if len(queries) == 0:
        return np.zeros(0)
    k = max(1, min(k, len(reference) - int(exclude_self)))
    index = NearestNeighbors(n_neighbors=k + int(exclude_self)).fit(reference)
    distances, _ = index.kneighbors(queries)
    return distances[:, -1].astype(np.float64)


def conformal_p_values(calibration: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``(1 + #{calibration >= s}) / (1 + n)`` for each score ``s``: small when ``s`` is larger than usual."""
    ordered = np.sort(np.asarray(calibration, dtype=np.float64))
    at_least = len(ordered) - np.searchsorted(ordered, np.asarray(scores, dtype=np.float64), side="left")
    return (1.0 + at_least) / (1.0 + len(ordered))


@dataclass(frozen=True)
class ShiftReference:
    """The run's training and validation embeddings (unit rows) and the validation images' kNN scores."""

    train: np.ndarray  # (N_train, F)
    val: np.ndarray  # (N_val, F): the held-out images of the training clinics
    val_scores: np.ndarray  # (N_val,) kNN distance of each validation image to the training images
    test_scores: np.ndarray  # (N_test,) the same of the test images (own images the alarm must not flag)
    k: int = K_NEIGHBOURS

    @classmethod
    def fit(cls, train: np.ndarray, val: np.ndarray, test: np.ndarray, k: int = K_NEIGHBOURS) -> ShiftReference:
        """The reference of training, validation and test embeddings (any scale; rows are made unit length)."""
        train, val = unit_rows(train), unit_rows(val)
        return cls(train, val, knn_distance(train, val, k), knn_distance(train, unit_rows(test), k), k)

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        """The kNN distance of each embedding (N, F) to the training images."""
        return knn_distance(self.train, unit_rows(embeddings), self.k)

    def p_values(self, scores: np.ndarray) -> np.ndarray:
        """Conformal p-values of kNN scores against the validation images' scores."""
        return conformal_p_values(self.val_scores, scores)

    def save(self, path: Path) -> None:
        """Write the reference atomically (float16 embeddings, float64 scores)."""
        with atomic_write(path, "wb") as fh:
            np.savez(
                fh,
                train=self.train.astype(np.float16),
                val=self.val.astype(np.float16),
                val_scores=self.val_scores,
                test_scores=self.test_scores,
                k=np.int64(self.k),
                version=np.int64(REFERENCE_VERSION),
            )

    @classmethod
    def load(cls, path: Path) -> ShiftReference | None:
        """The reference in ``path``, or None when it is absent, unreadable or of another version."""
        try:
            with np.load(path) as z:
                if int(z["version"]) != REFERENCE_VERSION:
                    return None
                train, val = z["train"].astype(np.float32), z["val"].astype(np.float32)
                return cls(train, val, z["val_scores"], z["test_scores"], int(z["k"]))
        except (OSError, KeyError, ValueError):
            return None


def alarm(reference: ShiftReference, embeddings: np.ndarray, level: float = DEFAULT_LEVEL) -> dict[str, np.ndarray]:
    """Per image: ``shift_score`` (kNN distance), ``shift_p`` (conformal p-value), ``out_of_distribution``."""
    scores = reference.scores(embeddings)
    p = reference.p_values(scores)
    return {"shift_score": scores, "shift_p": p, "out_of_distribution": p <= level}


def mmd_test(
    first: np.ndarray,
    second: np.ndarray,
    n_permutations: int = MMD_PERMUTATIONS,
    max_n: int = MMD_MAX_N,
    seed: int = 0,
) -> dict[str, Any]:
    """MMD² (unbiased, Gaussian kernel, median-distance bandwidth) between two samples with a permutation p-value.

    Each side is a random subset of at most ``max_n`` unit-length rows; ``p = (1 + #{permuted >= observed})
    / (1 + n_permutations)``.
    """
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(seed)
    x, y = (_subset(unit_rows(s), max_n, rng) for s in (first, second))
    pooled = np.concatenate([x, y]).astype(np.float64)
    squared = cdist(pooled, pooled, "sqeuclidean")
    off_diagonal = squared[np.triu_indices(len(pooled), 1)]
    bandwidth = float(np.median(off_diagonal[off_diagonal > 0])) if (off_diagonal > 0).any() else 1.0
    kernel = np.exp(-squared / bandwidth)
    n = len(x)
    observed = _mmd2(kernel, np.arange(len(pooled)) < n)
    permuted = np.array([_mmd2(kernel, rng.permutation(len(pooled)) < n) for _ in range(n_permutations)])
    return {
        "mmd2": observed,
        "p_value": float((1 + (permuted >= observed).sum()) / (1 + n_permutations)),
        "n_permutations": n_permutations,
        "n_new": len(first),
        "n_reference": len(second),
        "n_used": [len(x), len(y)],
        "bandwidth": bandwidth,
    }


def _subset(x: np.ndarray, max_n: int, rng: np.random.Generator) -> np.ndarray:
    return x if len(x) <= max_n else x[np.sort(rng.choice(len(x), max_n, replace=False))]


def _mmd2(kernel: np.ndarray, first: np.ndarray) -> float:
    """Unbiased MMD² of the split ``first`` / ``~first`` of a pooled kernel matrix."""
    a, b = np.flatnonzero(first), np.flatnonzero(~first)
    kxx, kyy, kxy = kernel[np.ix_(a, a)], kernel[np.ix_(b, b)], kernel[np.ix_(a, b)]
    m, n = len(a), len(b)
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean()
    )


def shift_summary(
    flags: dict[str, np.ndarray], level: float, reference: ShiftReference, embeddings: np.ndarray
) -> dict:
    """The alarm over a set of images: how many are flagged at ``level``, the score's spread, the MMD test,
    and how well the score tells these images from the run's own test images (AUROC; 0.5: not at all)."""
    from sklearn.metrics import roc_auc_score

    p, own = flags["shift_p"], reference.test_scores
    own_p = reference.p_values(own)
    both = np.concatenate([flags["shift_score"], own])
    is_new = np.r_[np.ones(len(p), bool), np.zeros(len(own), bool)]
    return {
        "level": level,
        "k": reference.k,
        "n_images": len(p),
        "n_flagged": int(flags["out_of_distribution"].sum()),
        "flag_rate": float(flags["out_of_distribution"].mean()) if len(p) else float("nan"),
        "expected_false_alarm_rate": level,
        "flag_rate_at": {f"{lv:g}": float((p <= lv).mean()) for lv in (0.01, 0.05, 0.10)},
        "median_score": float(np.median(flags["shift_score"])),
        "median_val_score": float(np.median(reference.val_scores)),
        "n_val": len(reference.val_scores),
        "n_train": len(reference.train),
        "n_test": len(own),
        "test_flag_rate": float((own_p <= level).mean()) if len(own) else float("nan"),
        "auroc_against_test": float(roc_auc_score(is_new, both)) if len(own) and len(p) else float("nan"),
        "dataset_test": mmd_test(embeddings, reference.val),
    }


def reference_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / REFERENCE_FILE


def shift_reference(run_dir: str | Path, show: bool = False) -> ShiftReference | None:
    """The run's reference: read from ``RUN/shift_reference.npz``, else computed from the run's data and kept.

    None, with a note, for a model without an image branch or a run whose data cannot be read.
    """
    path = reference_path(run_dir)
    kept = ShiftReference.load(path) if path.is_file() else None
    if kept is not None:
        return kept
    from .folder import RunFolder

    cfg = RunFolder(run_dir).read_config()
    if cfg.model.name == "metadata_only":
        return None
    try:
        train, val, test = split_embeddings(run_dir, ("train", "val", "test"), show)
    except MMLesionError as exc:
        note(f"shift alarm not computed: the run's data cannot be read ({exc})")
        return None
    reference = ShiftReference.fit(train, val, test)
    try:
        reference.save(path)
    except OSError as exc:  # a read-only run folder: computed again next time
        note(f"shift alarm: the reference could not be kept in {path} ({exc})")
    return reference


def split_embeddings(run_dir: str | Path, splits: tuple[str, ...], show: bool = False) -> list[np.ndarray]:
    """The run's image embeddings of each split, as its head reads them (cached for frozen runs)."""
    from .load import load_run

    inputs = load_run(run_dir, show=show).inputs
    if inputs.model.image_branch is None:
        raise MMLesionError(f"model '{inputs.cfg.model.name}' does not look at the image")
    if show:
        print(f"embedding the run's {', '.join(splits)} images for the shift alarm", flush=True)
    out = []
    for split in splits:
        rows = np.flatnonzero(inputs.splits["split"].to_numpy() == split)
        embedded = inputs.embeddings_of(rows) if len(rows) else None
        width = inputs.model.image_branch.num_features
        out.append(np.zeros((0, width), np.float32) if embedded is None else embedded.float().cpu().numpy())
    return out
