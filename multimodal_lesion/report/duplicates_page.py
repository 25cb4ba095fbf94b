"""The review page of a near-duplicate search: candidate pairs side by side, best score first.

A person decides what is the same lesion: the page shows each pair's two thumbnails, ids, groups
and labels (a label disagreement is marked: either a leak that also mislabels, or two different
lesions that merely look alike), the embedding similarity, the keypoint inliers and the score, and
whether the pair is above the merge threshold. Like the explanation report it is one self-contained
file (thumbnails as JPEG data URIs, inline CSS, no script, no network) rendered with autoescape.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .html import _common, _environment, _text, _write

#: Longest side of a thumbnail, in pixels.
THUMBNAIL_SIDE = 160


def thumbnail_uri(image: np.ndarray, side: int = THUMBNAIL_SIDE) -> str:
    """A uint8 RGB image (H, W, 3) as a JPEG data URI no larger than ``side`` pixels."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(image))
    img.thumbnail((side, side))
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def write_review_page(
    out: str | Path,
    pairs: pd.DataFrame,
    images: Callable[[int], tuple[np.ndarray, np.ndarray]],
    *,
    title: str,
    threshold: float,
    merges: pd.DataFrame,
    facts: Mapping[str, Any],
    shown: int = 200,
) -> Path:
    """Write the review page of ``pairs`` (``pairs.csv``'s columns) to ``out``; returns its path.

    Args:
        out: the HTML file.
        pairs: the ranked pairs; the first ``shown`` rows are drawn.
        images: row number of ``pairs`` -> the pair's two uint8 images.
        title: the page's heading (the datasets compared).
        threshold: the merge threshold: pairs at or above it are marked.
        merges: :func:`~multimodal_lesion.runs.duplicates.merge_counts`'s table, one row per threshold.
        facts: name -> value lines of provenance (data roots, images, settings).
    """
    rows = [_pair_view(pairs.iloc[k], images(k), threshold) for k in range(min(shown, len(pairs)))]
    view = {
        "title": _text(title),
        "n_pairs": len(pairs),
        "n_shown": len(rows),
        "n_above": int((pairs["score"] >= threshold).sum()),
        "n_differ": int(pairs["labels_differ"].sum()),
        "threshold": f"{threshold:.2f}",
        "merges": _merge_rows(merges),
        "merge_columns": [c for c in merges.columns if c != "threshold"],
        "facts": [(_text(k), _text(v)) for k, v in facts.items()],
        "pairs": rows,
    }
    page = _environment().get_template("duplicates.html").render(view=view, **_common())
    out = Path(out)
    _write(out, page)
    return out


def _pair_view(row: pd.Series, images: Sequence[np.ndarray], threshold: float) -> dict[str, Any]:
    """One pair as the template shows it: plain strings and two thumbnails."""
    return {
        "rank": int(row["rank"]),
        "ids": (_text(row["image_id_1"]), _text(row["image_id_2"])),
        "groups": (_text(row["group_1"]), _text(row["group_2"])),
        "labels": (_text(row["label_1"]), _text(row["label_2"])),
        "differ": bool(row["labels_differ"]),
        "similarity": f"{float(row['similarity']):.3f}",
        "inliers": int(row["inliers"]),
        "same_patient": bool(row["same_patient"]),
        "score": f"{float(row['score']):.3f}",
        "above": float(row["score"]) >= threshold,
        "thumbnails": (thumbnail_uri(images[0]), thumbnail_uri(images[1])),
    }


def _merge_rows(merges: pd.DataFrame) -> list[dict[str, Any]]:
    """The threshold table's rows as strings."""
    return [
        {
            "threshold": f"{float(r['threshold']):.2f}",
            "cells": [str(int(r[c])) for c in merges.columns if c != "threshold"],
        }
        for _, r in merges.iterrows()
    ]
