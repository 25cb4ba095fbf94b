"""Near-duplicate images: the same lesion under two group ids, or in two datasets.

No column shows these leaks, and perceptual hashes only catch exact re-encodings (dermoscopy images
are all "a dark blob in the middle of skin"). So the search runs in two steps:

1. **Candidates** from the nearest neighbours of the frozen backbone's embeddings (the cached,
   flip-averaged pass of :mod:`~multimodal_lesion.runs.embeddings`, so a flipped copy has the same
   embedding), centred on the pool's mean and compared by cosine similarity in blocked matrix
   products: never a Python loop over pairs.
2. **Verification** of each candidate by local features: ORB keypoints matched with Lowe's ratio
   test, then a RANSAC affine fit; the count of matches the fit explains (its inliers) is the
   evidence that two pictures show the same skin. The image is also matched mirrored, since ORB's
   descriptors are rotation-invariant but not mirror-invariant.

The :func:`pair_score` of a pair combines both (validated on HAM10000's same-lesion pairs, see
``docs/duplicates.md``); each image keeps its ``top`` best candidates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..config import ExperimentConfig, replace
from ..data.dataset import LesionDataset
from ..errors import ConfigError


@dataclass(frozen=True)
class DuplicateSettings:
    """How candidates are found and verified (the defaults are the ones measured in ``docs/duplicates.md``)."""

    neighbours: int = 10  # embedding neighbours per image that are verified by keypoints
    patient_neighbours: int = 30  # and nearest among the images that could be the same patient's
    top: int = 5  # candidates kept per image, best score first
    keypoints: int = 300  # ORB keypoints per image (and as many on its mirror image)
    ratio: float = 0.8  # Lowe's ratio test: a match must beat the second best by this factor
    size: tuple[int, int] = (240, 320)  # (height, width) the images are matched at
    block: int = 1024  # query rows per similarity block (block x pool float32 at a time)
    threads: int = 2  # keypoint extraction and matching threads (OpenCV releases the GIL)
    unknown: tuple[str, ...] = (
        "",
        "unknown",
        "unk",
        "nan",
        "na",
        "n/a",
        "none",
        "null",
    )  # patient values read as unknown

    def check(self) -> DuplicateSettings:
        """Refuse counts below 1 and a ratio outside (0, 1]."""
        for name in ("neighbours", "patient_neighbours", "top", "keypoints", "block", "threads"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"duplicates.{name}: must be >= 1, got {getattr(self, name)!r}")
        if not 0 < self.ratio <= 1:
            raise ConfigError(f"duplicates.ratio: must be in (0, 1], got {self.ratio!r}")
        return self


# --- step 1: embedding neighbours -----------------------------------------------------------------


def centred_unit(embeddings: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Rows minus ``mean``, scaled to unit length (float32): cosine similarity is then a dot product.

    Centring removes what every dermoscopy image shares, so the similarity measures what is particular.
    """
    x = np.asarray(embeddings, dtype=np.float32) - mean.astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


#: Fewer pooled images than this: cosine of centred embeddings (a covariance of fewer is too noisy to whiten).
MIN_WHITENED = 2000
#: Principal components kept by the whitening.
WHITENED_DIMS = 256


def retrieval_space(first: np.ndarray, second: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows of both sets in the space their nearest neighbours are searched in.

    From :data:`MIN_WHITENED` pooled images on, the embeddings are PCA-whitened on the pool (the top
    :data:`WHITENED_DIMS` components, each scaled to unit variance): directions that every dermoscopy
    image varies along no longer dominate, and same-lesion pairs come up far more often (measured
    in ``docs/duplicates.md``). Below it, centred cosine.
    """
    both = first if second is None else np.concatenate([first, second])
    mean = np.asarray(both, dtype=np.float64).mean(0)
    if len(both) < MIN_WHITENED:
        a = centred_unit(first, mean)
        return a, a if second is None else centred_unit(second, mean)
    x = np.asarray(both, dtype=np.float32) - mean.astype(np.float32)
    values, vectors = np.linalg.eigh((x.T @ x).astype(np.float64) / len(x))
    keep = np.argsort(values)[::-1][: min(WHITENED_DIMS, x.shape[1])]
    projection = (vectors[:, keep] / np.sqrt(np.maximum(values[keep], 1e-12))).astype(np.float32)

    def project(e: np.ndarray) -> np.ndarray:
        return centred_unit(
            (np.asarray(e, dtype=np.float32) - mean.astype(np.float32)) @ projection, np.zeros(len(keep))
        )

    a = project(first)
    return a, a if second is None else project(second)


def nearest_neighbours(
    query: np.ndarray,
    pool: np.ndarray,
    k: int,
    *,
    query_groups: np.ndarray | None = None,
    pool_groups: np.ndarray | None = None,
    skip_self: bool = False,
    block: int = 1024,
    allowed: Callable[[int, int], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar pool rows of every query row, by dot product, in blocks of query rows.

    Args:
        query, pool: unit rows (:func:`centred_unit`), (N, F) and (M, F).
        k: neighbours per query row (at most M, fewer where rows are excluded: index -1).
        query_groups, pool_groups: integer group codes; when both are given a pool row of the query
            row's own group is never its neighbour (pairs within one lesion are no news).
        skip_self: query and pool are the same rows: a row is never its own neighbour.
        block: query rows per matrix product (memory: block x M float32).
        allowed: ``allowed(start, stop)`` -> bool (stop - start, M): which pool rows each query row may take.

    Returns:
        (indices (N, k) int64, similarities (N, k) float32), most similar first; -1 / -inf where none.
    """
    k = min(k, len(pool))
    indices = np.full((len(query), k), -1, dtype=np.int64)
    sims = np.full((len(query), k), -np.inf, dtype=np.float32)
    for start in range(0, len(query), block):
        stop = min(start + block, len(query))
        s = query[start:stop] @ pool.T
        if query_groups is not None and pool_groups is not None:
            s[query_groups[start:stop, None] == pool_groups[None, :]] = -np.inf
        if skip_self:
            rows = np.arange(start, stop)
            s[rows - start, rows] = -np.inf
        if allowed is not None:
            s[~allowed(start, stop)] = -np.inf
        top = np.argpartition(-s, k - 1, axis=1)[:, :k] if k < s.shape[1] else np.tile(np.arange(k), (len(s), 1))
        top_s = np.take_along_axis(s, top, axis=1)
        order = np.argsort(-top_s, axis=1, kind="stable")
        top, top_s = np.take_along_axis(top, order, axis=1), np.take_along_axis(top_s, order, axis=1)
        top[~np.isfinite(top_s)] = -1
        indices[start:stop], sims[start:stop] = top, top_s
    return indices, sims


# --- step 2: keypoint verification ----------------------------------------------------------------


@dataclass(frozen=True)
class Keypoints:
    """ORB keypoints of one image: positions (n, 2) float32 and descriptors (n, 32) uint8, as seen and mirrored."""

    points: np.ndarray
    descriptors: np.ndarray
    mirrored_points: np.ndarray
    mirrored_descriptors: np.ndarray


def keypoints_of(image: np.ndarray, settings: DuplicateSettings) -> Keypoints:
    """ORB keypoints of a uint8 RGB image (H, W, 3), resized to ``settings.size``, and of its mirror image."""
    import cv2

    height, width = settings.size
    grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    if grey.shape != (height, width):
        grey = cv2.resize(grey, (width, height), interpolation=cv2.INTER_AREA)
    ellipse = np.zeros((height, width), np.uint8)  # the inscribed ellipse, without dark (dermoscope) borders:
    cv2.ellipse(ellipse, (width // 2, height // 2), (width * 9 // 20, height * 9 // 20), 0, 0, 360, 255, -1)
    lit = (cv2.blur(grey, (5, 5)) > 40).astype(np.uint8) * 255  # their edge is the same in every image
    inside = cv2.erode(ellipse & lit, np.ones((17, 17), np.uint8))
    grey = cv2.equalizeHist(grey)  # exposure and colour balance differ between two photographs
    orb = cv2.ORB.create(nfeatures=settings.keypoints, edgeThreshold=15, patchSize=15, fastThreshold=5)

    def detect(img: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        kps, desc = orb.detectAndCompute(img, mask)
        if desc is None:
            return np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8)
        return np.array([kp.pt for kp in kps], dtype=np.float32), desc

    points, desc = detect(grey, inside)
    mirrored, mirrored_desc = detect(np.ascontiguousarray(grey[:, ::-1]), np.ascontiguousarray(inside[:, ::-1]))
    return Keypoints(points, desc, mirrored, mirrored_desc)


def all_keypoints(images: np.ndarray, rows: np.ndarray, settings: DuplicateSettings) -> dict[int, Keypoints]:
    """:func:`keypoints_of` of ``images[rows]`` (an (N, H, W, 3) array, memory-mapped or not), in threads."""
    with ThreadPoolExecutor(max_workers=settings.threads) as pool:
        found = pool.map(lambda r: keypoints_of(np.asarray(images[r]), settings), rows)
        return dict(zip(rows.tolist(), found, strict=True))


def inliers(a: Keypoints, b: Keypoints, ratio: float) -> int:
    """Matches between ``a`` and ``b`` (or ``b`` mirrored) that one RANSAC affine transform explains; the larger."""
    return max(
        _inliers(a.points, a.descriptors, b.points, b.descriptors, ratio),
        _inliers(a.points, a.descriptors, b.mirrored_points, b.mirrored_descriptors, ratio),
    )


def _inliers(pa: np.ndarray, da: np.ndarray, pb: np.ndarray, db: np.ndarray, ratio: float) -> int:
    """Ratio-test matches of descriptors ``da`` -> ``db`` that a RANSAC affine fit keeps (0 below 4 matches)."""
    import cv2

    if len(da) < 4 or len(db) < 4:
        return 0
    matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
    good = [m[0] for m in matcher.knnMatch(da, db, k=2) if len(m) == 2 and m[0].distance < ratio * m[1].distance]
    if len(good) < 4:
        return 0
    src = pa[[m.queryIdx for m in good]]
    dst = pb[[m.trainIdx for m in good]]
    fit, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=4.0, maxIters=2000)
    if fit is None or mask is None:
        return 0
    scale = float(np.sqrt(abs(np.linalg.det(fit[:, :2]))))
    if not MIN_SCALE <= scale <= 1 / MIN_SCALE:  # a collapsed fit maps many keypoints onto one spot
        return 0
    kept = mask.ravel().astype(bool)
    return int(min(len(np.unique(src[kept], axis=0)), len(np.unique(dst[kept], axis=0))))


#: The smallest zoom between two photographs of one lesion that the geometric check accepts (and its inverse).
MIN_SCALE = 0.33


def verify_pairs(
    first: dict[int, Keypoints], second: dict[int, Keypoints], pairs: np.ndarray, settings: DuplicateSettings
) -> np.ndarray:
    """:func:`inliers` of every pair (i, j) of ``pairs`` (P, 2): ``i`` indexes ``first``, ``j`` ``second``."""
    with ThreadPoolExecutor(max_workers=settings.threads) as pool:
        found = pool.map(lambda p: inliers(first[int(p[0])], second[int(p[1])], settings.ratio), pairs)
        return np.fromiter(found, dtype=np.int64, count=len(pairs))


#: What a pair gains when its patient features could be one patient's (:class:`PatientMatch`).
PATIENT_BONUS = 0.25
#: Inliers that two different lesions reach by chance (skin texture): 95% of such candidate pairs on HAM10000.
CHANCE_INLIERS = 4
#: Inliers beyond the chance ones that count half of the keypoint evidence.
HALF_EVIDENCE = 10.0


def pair_score(similarity: np.ndarray, inliers: np.ndarray, same_patient: np.ndarray | None = None) -> np.ndarray:
    """One number per pair, higher = more likely the same lesion: the embedding similarity (-1..1, in
    :func:`retrieval_space`), plus the keypoint evidence ``e / (e + 10)`` (0..1) of the inliers beyond
    chance, ``e = max(inliers - 4, 0)`` (:data:`CHANCE_INLIERS`, :data:`HALF_EVIDENCE`), plus
    :data:`PATIENT_BONUS` where the patient features agree.

    A re-encoded, resized, flipped or rotated copy has a high similarity and dozens of inliers; two
    photographs of one lesion months apart a fair similarity and a few inliers beyond chance; two
    different naevi a low similarity and the chance inliers of skin texture (up to 4, which count nothing).
    """
    beyond = np.maximum(np.asarray(inliers, dtype=np.float64) - CHANCE_INLIERS, 0.0)
    evidence = beyond / (beyond + HALF_EVIDENCE)
    bonus = 0.0 if same_patient is None else PATIENT_BONUS * np.asarray(same_patient, dtype=np.float64)
    return np.asarray(similarity, dtype=np.float64) + evidence + bonus


# --- the search ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Side:
    """One dataset as the search sees it: embeddings (N, F), images (N, H, W, 3) uint8 and group codes (N,)."""

    embeddings: np.ndarray
    images: Any  # an (N, H, W, 3) uint8 array (memory-mapped) or a RowView of one
    groups: np.ndarray
    patient: pd.DataFrame | None = None  # categorical patient features (text) and "age" (float), per image


#: Two ages (years) of one lesion's images differ by at most this much (follow-up photographs).
AGE_SLACK = 5.0


class PatientMatch:
    """Which image pairs could be one patient's one lesion: the categorical patient features both sets
    have are equal (or one is unknown), and the ages differ by at most :data:`AGE_SLACK` years (or one is unknown)."""

    def __init__(self, first: pd.DataFrame, second: pd.DataFrame, unknown: Sequence[str]) -> None:
        columns = [c for c in first.columns if c in second.columns and c != "age"]
        unknown_set = {u.lower() for u in unknown}
        codes = []
        for c in columns:
            text = pd.concat([first[c], second[c]]).astype(str).str.strip().str.lower()
            code = pd.factorize(text)[0]
            code[text.isin(unknown_set).to_numpy()] = -1
            codes.append(code)
        both = np.stack(codes, axis=1) if codes else np.zeros((len(first) + len(second), 0), np.int64)
        self.codes = (both[: len(first)], both[len(first) :])
        self.ages = (_ages(first), _ages(second))

    @property
    def informative(self) -> bool:
        """Whether the two sets share any patient feature (else every pair would agree)."""
        return bool(self.codes[0].shape[1]) or bool(np.isfinite(self.ages[0]).any() and np.isfinite(self.ages[1]).any())

    def __call__(self, start: int, stop: int, reverse: bool = False) -> np.ndarray:
        """bool (stop - start, M): rows start..stop of the first set (the second with ``reverse``) against the other."""
        q, p = (1, 0) if reverse else (0, 1)
        cq, cp = self.codes[q][start:stop], self.codes[p]
        ok = np.ones((len(cq), len(cp)), dtype=bool)
        for f in range(cq.shape[1]):
            a, b = cq[:, f][:, None], cp[:, f][None, :]
            ok &= (a == b) | (a < 0) | (b < 0)
        gap = np.abs(self.ages[q][start:stop, None] - self.ages[p][None, :])
        return ok & ~(gap > AGE_SLACK)

    def pairs(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """bool (P,): whether image ``i[k]`` of the first set and ``j[k]`` of the second could be one patient's."""
        a, b = self.codes[0][i], self.codes[1][j]
        ok = ((a == b) | (a < 0) | (b < 0)).all(axis=1)
        return ok & ~(np.abs(self.ages[0][i] - self.ages[1][j]) > AGE_SLACK)


def _ages(frame: pd.DataFrame) -> np.ndarray:
    return (
        pd.to_numeric(frame["age"], errors="coerce").to_numpy(np.float64)
        if "age" in frame.columns
        else np.full(len(frame), np.nan)
    )


def candidate_pairs(
    first: Side,
    second: Side | None,
    settings: DuplicateSettings,
    *,
    same_group: bool = False,
) -> pd.DataFrame:
    """Every image's best candidates: ``i`` (row of ``first``), ``j`` (row of ``second``, or of ``first``
    within one dataset), ``similarity``, ``inliers``, ``score``, ``rank_i`` / ``rank_j`` (the pair's place
    among each image's candidates, 1 = best) and ``rank`` (by score over all pairs).

    Within one dataset (``second`` None) a pair is listed once (i < j) and, unless ``same_group``,
    only when the two groups differ. Across two datasets every image of ``first`` and of ``second``
    gets its candidates from the other one.
    """
    settings.check()
    pool = first if second is None else second
    a, b = retrieval_space(first.embeddings, None if second is None else second.embeddings)
    match = None
    if first.patient is not None and pool.patient is not None:
        match = PatientMatch(first.patient, pool.patient, settings.unknown)
        match = match if match.informative else None
    groups = None if same_group or second is not None else first.groups
    pairs = _neighbour_pairs(a, b, groups, match, settings, within=second is None)
    similarity = np.einsum("ij,ij->i", a[pairs[:, 0]], b[pairs[:, 1]])
    found_inliers = _verified(first, pool, pairs, settings, within=second is None)
    same_patient = match.pairs(pairs[:, 0], pairs[:, 1]) if match is not None else np.zeros(len(pairs), bool)
    frame = pd.DataFrame(
        {
            "i": pairs[:, 0],
            "j": pairs[:, 1],
            "similarity": similarity,
            "inliers": found_inliers,
            "same_patient": same_patient,
            "score": pair_score(similarity, found_inliers, same_patient),
        }
    )
    return _ranked(frame, settings.top, within=second is None)


def _neighbour_pairs(
    a: np.ndarray,
    b: np.ndarray,
    groups: np.ndarray | None,
    match: PatientMatch | None,
    settings: DuplicateSettings,
    *,
    within: bool,
) -> np.ndarray:
    """Distinct (row of a, row of b) pairs: each row's nearest overall and nearest of one patient, both ways."""
    found = []
    sets = [(None, settings.neighbours), *([(match, settings.patient_neighbours)] if match is not None else [])]
    for allowed, k in sets:
        idx, _ = nearest_neighbours(
            a,
            b,
            k,
            query_groups=groups,
            pool_groups=groups,
            skip_self=within,
            block=settings.block,
            allowed=allowed,
        )
        found.append(_pairs_of(idx))
        if not within:  # and each image of the second set looks for its neighbours in the first
            back_allowed = None if allowed is None else (lambda s, e, m=allowed: m(s, e, reverse=True))
            back, _ = nearest_neighbours(b, a, k, block=settings.block, allowed=back_allowed)
            found.append(_pairs_of(back)[:, ::-1])
    pairs = np.unique(np.concatenate(found), axis=0)
    return np.unique(np.sort(pairs, axis=1), axis=0) if within else pairs


def _verified(first: Side, pool: Side, pairs: np.ndarray, settings: DuplicateSettings, *, within: bool) -> np.ndarray:
    """:func:`inliers` of every pair, each image's keypoints computed once."""
    if within:
        kp = all_keypoints(first.images, np.unique(pairs.ravel()), settings)
        return verify_pairs(kp, kp, pairs, settings)
    kp_a = all_keypoints(first.images, np.unique(pairs[:, 0]), settings)
    kp_b = all_keypoints(pool.images, np.unique(pairs[:, 1]), settings)
    return verify_pairs(kp_a, kp_b, pairs, settings)


def _pairs_of(indices: np.ndarray) -> np.ndarray:
    """(P, 2) pairs (row, neighbour) of a neighbour table, without the -1 fillers."""
    rows = np.repeat(np.arange(len(indices)), indices.shape[1])
    cols = indices.ravel()
    keep = cols >= 0
    return np.stack([rows[keep], cols[keep]], axis=1)


def _ranked(frame: pd.DataFrame, top: int, within: bool) -> pd.DataFrame:
    """Each pair's rank among the candidates of its first and its second image; pairs in neither's top kept out."""
    frame = frame.sort_values(["score", "i", "j"], ascending=[False, True, True], kind="stable").reset_index(drop=True)
    if within:  # one pool of images: a pair counts among both of its images' candidates
        n = len(frame)
        image = np.concatenate([frame["i"].to_numpy(), frame["j"].to_numpy()])
        order = np.argsort(np.tile(np.arange(n), 2), kind="stable")  # pair by pair, best score first
        place = np.empty(2 * n, dtype=np.int64)
        place[order] = pd.Series(image[order]).groupby(image[order]).cumcount().to_numpy() + 1
        frame["rank_i"], frame["rank_j"] = place[:n], place[n:]
    else:
        frame["rank_i"] = frame.groupby("i").cumcount().to_numpy() + 1
        frame["rank_j"] = frame.groupby("j").cumcount().to_numpy() + 1
    frame = frame[(frame["rank_i"] <= top) | (frame["rank_j"] <= top)].reset_index(drop=True)
    frame["rank"] = np.arange(1, len(frame) + 1)
    return frame


def group_codes(values: pd.Series) -> np.ndarray:
    """Integer codes of a group column (equal ids, equal codes)."""
    return pd.factorize(values.astype(str))[0].astype(np.int64)


# --- datasets in, a table of named pairs out ----------------------------------------------------------


def split_groups(dataset: LesionDataset) -> pd.Series:
    """The ids a split keeps together: patients when the schema groups by patient, else lesions."""
    column = "patient_id" if dataset.schema.group_by == "patient" else "lesion_id"
    return dataset.metadata[column].astype(str)


def dataset_side(cfg: ExperimentConfig, dataset: LesionDataset, show: bool = True) -> Side:
    """The embeddings (``cfg``'s frozen pass: same settings, same cache as training) and images of ``dataset``."""
    from .inputs import prepare_inputs

    # the images as they were: a near-duplicate is one of the files, whatever colour constancy a run applies
    cfg = replace(cfg, model={"name": "image_only"}, train={"mode": "frozen"}, data={"color_constancy": "none"})
    everything = dataset.metadata[["image_id"]].assign(split="train")
    inputs = prepare_inputs(cfg, dataset, everything)
    return Side(inputs.embeddings(show), inputs.images(), group_codes(split_groups(dataset)), patient_table(dataset))


def patient_table(dataset: LesionDataset) -> pd.DataFrame:
    """The patient features two images of one lesion share: the schema's categorical ones, and the age as ``age``."""
    features = dataset.schema.features
    meta = dataset.metadata
    table = meta[[c for c in features.categorical if c in meta.columns]].copy()
    if features.age_feature and features.age_feature in meta.columns:
        table["age"] = meta[features.age_feature].to_numpy()
    return table.reset_index(drop=True)


def named_pairs(candidates: pd.DataFrame, first: LesionDataset, second: LesionDataset | None = None) -> pd.DataFrame:
    """``candidates`` (:func:`candidate_pairs`) with both image ids, group ids and labels: ``pairs.csv``."""
    other = first if second is None else second
    a, b = first.metadata.iloc[candidates["i"]], other.metadata.iloc[candidates["j"]]
    ga, gb = split_groups(first).iloc[candidates["i"]], split_groups(other).iloc[candidates["j"]]
    return pd.DataFrame(
        {
            "rank": candidates["rank"].to_numpy(),
            "image_id_1": a["image_id"].to_numpy(),
            "image_id_2": b["image_id"].to_numpy(),
            "group_1": ga.to_numpy(),
            "group_2": gb.to_numpy(),
            "label_1": a["dx"].to_numpy(),
            "label_2": b["dx"].to_numpy(),
            "labels_differ": a["dx"].to_numpy() != b["dx"].to_numpy(),
            "similarity": candidates["similarity"].round(4).to_numpy(),
            "inliers": candidates["inliers"].to_numpy(),
            "same_patient": candidates["same_patient"].to_numpy(),
            "score": candidates["score"].round(4).to_numpy(),
            "rank_1": candidates["rank_i"].to_numpy(),
            "rank_2": candidates["rank_j"].to_numpy(),
        }
    )


def merge_counts(dataset: LesionDataset, pairs: pd.DataFrame, thresholds: Sequence[float]) -> pd.DataFrame:
    """What merging the pairs scored at or above each threshold does: pairs, lesions and patients left.

    Pairs are joined transitively (a chain is one group), as ``--duplicates`` does.
    """
    meta = dataset.metadata
    position = pd.Series(np.arange(len(meta)), index=meta["image_id"].to_numpy())
    rows = []
    for threshold in thresholds:
        chosen = pairs[pairs["score"] >= threshold]
        i, j = position[chosen["image_id_1"]].to_numpy(), position[chosen["image_id_2"]].to_numpy()
        row = {"threshold": threshold, "pairs": len(chosen), "lesions": _components(meta["lesion_id"], i, j)}
        if "patient_id" in meta.columns:
            row["patients"] = _components(meta["patient_id"], i, j)
        rows.append(row)
    return pd.DataFrame(rows)


def _components(ids: pd.Series, i: np.ndarray, j: np.ndarray) -> int:
    """How many groups ``ids`` leaves once the images ``i[k]`` and ``j[k]`` are put in one group."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    codes = group_codes(ids)
    n = int(codes.max()) + 1 if len(codes) else 0
    graph = coo_matrix((np.ones(len(i)), (codes[i], codes[j])), shape=(n, n))
    return int(connected_components(graph, directed=False)[0])


def duplicates_file(pairs: pd.DataFrame, threshold: float, columns: tuple[str, str]) -> pd.DataFrame:
    """The pairs scored at or above ``threshold`` in the two columns a ``--duplicates`` file has (the schema's)."""
    chosen = pairs[pairs["score"] >= threshold]
    return pd.DataFrame({columns[0]: chosen["image_id_1"].to_numpy(), columns[1]: chosen["image_id_2"].to_numpy()})


#: Score thresholds the command reports (pairs merged, groups left); the default merge threshold is one of them.
THRESHOLDS: tuple[float, ...] = (0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6)
DEFAULT_THRESHOLD = 1.2


@dataclass
class DuplicateSearch:
    """What :func:`search_duplicates` found: the named pairs and what each threshold would merge."""

    pairs: pd.DataFrame
    merges: pd.DataFrame
    first: LesionDataset
    second: LesionDataset | None
    sides: tuple[Side, Side | None]
    seconds: float

    def images(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """The two uint8 images of the pair in row ``row`` of :attr:`pairs`, as the search saw them."""
        a, b = self.sides[0], self.sides[1] or self.sides[0]
        i, j = self._rows(row)
        return np.asarray(a.images[i]), np.asarray(b.images[j])

    def _rows(self, row: int) -> tuple[int, int]:
        pair = self.pairs.iloc[row]
        first = self.first.metadata["image_id"]
        second = (self.second or self.first).metadata["image_id"]
        i = int(np.flatnonzero(first.to_numpy() == pair["image_id_1"])[0])
        j = int(np.flatnonzero(second.to_numpy() == pair["image_id_2"])[0])
        return i, j


def search_duplicates(
    cfg: ExperimentConfig,
    first: LesionDataset,
    second: LesionDataset | None = None,
    settings: DuplicateSettings = DuplicateSettings(),
    thresholds: Sequence[float] = THRESHOLDS,
    show: bool = True,
    sides: tuple[Side, Side | None] | None = None,
) -> DuplicateSearch:
    """Near-duplicate pairs within ``first`` (groups differ) or between ``first`` and ``second``.

    ``sides``: :func:`dataset_side` of each, when already built. The embeddings are ``cfg``'s frozen
    pass (its backbone, weights, image size and flips: the same settings reuse the same cache as
    training). See the module docstring for the method.
    """
    import time

    start = time.perf_counter()
    if sides is None:
        sides = (dataset_side(cfg, first, show), None if second is None else dataset_side(cfg, second, show))
    if show:
        print("verifying candidates with keypoints", flush=True)
    found = candidate_pairs(sides[0], sides[1], settings)
    pairs = named_pairs(found, first, second)
    merges = merge_counts(first, pairs, thresholds) if second is None else covered_counts(pairs, thresholds)
    return DuplicateSearch(pairs, merges, first, second, sides, time.perf_counter() - start)


def covered_counts(pairs: pd.DataFrame, thresholds: Sequence[float]) -> pd.DataFrame:
    """Across two datasets: per threshold, the pairs and how many images of each side they touch."""
    rows = []
    for threshold in thresholds:
        chosen = pairs[pairs["score"] >= threshold]
        rows.append(
            {
                "threshold": threshold,
                "pairs": len(chosen),
                "images of the first": chosen["image_id_1"].nunique(),
                "images of the second": chosen["image_id_2"].nunique(),
            }
        )
    return pd.DataFrame(rows)


def training_near_duplicates(
    run_dir: str | Path, other: LesionDataset, threshold: float = DEFAULT_THRESHOLD, show: bool = True
) -> pd.DataFrame | None:
    """The pairs (OTHER's image, a training image of the run) scored at or above ``threshold``.

    The run's own data is read again from its ``data.root`` with its stored schema; both sides are
    embedded with the run's backbone settings (the training images' embeddings are the cached ones of
    a frozen run). None, with a note, where it cannot be checked: no image branch, no images, or the
    run's data no longer where it was.
    """
    from ..errors import MMLesionError, note
    from .folder import RunFolder
    from .inputs import resolve_data

    run = RunFolder(run_dir)
    cfg = run.read_config()
    if cfg.model.name == "metadata_only" or not other.has_images or not cfg.data.root:
        return None
    try:
        own = resolve_data(cfg, show=False, schema=run.read_schema())
    except MMLesionError as exc:
        note(f"near-duplicates of the run's training images not checked: its data cannot be read ({exc})")
        return None
    train_ids = set(run.read_splits().query("split == 'train'")["image_id"])
    rows = np.flatnonzero(own.metadata["image_id"].isin(train_ids).to_numpy())
    train = dataclasses.replace(own, metadata=own.metadata.iloc[rows].reset_index(drop=True))
    if show:
        print(f"looking for near-duplicates of the run's {len(rows)} training images in {other.root}", flush=True)
    whole = dataset_side(cfg, own, show)  # the cached embeddings of the run's data, then its training rows
    sides = (
        dataset_side(cfg, other, show),
        Side(whole.embeddings[rows], RowView(whole.images, rows), whole.groups[rows], train_patients(own, rows)),
    )
    found = search_duplicates(cfg, other, train, DuplicateSettings(), (threshold,), show=show, sides=sides)
    return found.pairs[found.pairs["score"] >= threshold].reset_index(drop=True)


def train_patients(dataset: LesionDataset, rows: np.ndarray) -> pd.DataFrame:
    """:func:`patient_table` of ``rows`` of ``dataset``."""
    return patient_table(dataset).iloc[rows].reset_index(drop=True)


class RowView:
    """Rows ``rows`` of an image array, read one at a time (no copy of a memory-mapped cache)."""

    def __init__(self, base: np.ndarray, rows: np.ndarray) -> None:
        self.base, self.rows = base, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> np.ndarray:
        return np.asarray(self.base[int(self.rows[k])])
