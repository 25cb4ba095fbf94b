"""Finished cases kept on disk as they finish, so that a killed ``mmlesion explain`` resumes without redoing them.

Two stores, in the report's folder. :class:`ChunkStore` keeps each finished chunk of cases whole (its
results, maps and what the report drew of it) in ``.explain-chunks/``, keyed by the chunk's cases and
everything they depend on (the run's checkpoint, its config with the explain settings, the data, the
split); a rerun into the folder reads the chunks back and computes only the others. The files are
Python pickles written by mmlesion for its own reruns, like a checkpoint: read them only from a folder
you made.

Within a chunk, the costly per-case work is the faithfulness curves (:mod:`.faithfulness`). Each finished
case's report is appended to a JSON-lines file in the output folder, under a key made of everything the
report depends on: the case (image id, explained class, its CAM's bytes) and the settings (steps, ROAD
percentiles, seed, the baseline maps, the backend). A rerun into the same folder reads the file and measures
only the cases it does not hold; a line cut short by the kill is skipped. Nothing else is reused: a report
whose key differs is measured again.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_write

Report = dict[str, dict[str, float]]
FILE_NAME = "faithfulness-cases.jsonl"
CHUNK_DIR = ".explain-chunks"


def case_key(image_id: str, target: int, cam: np.ndarray, settings: Mapping[str, Any]) -> str:
    """A digest of what one case's faithfulness report depends on."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps({"id": image_id, "target": target, **settings}, sort_keys=True, default=str).encode())
    digest.update(np.ascontiguousarray(cam, dtype=np.float32).tobytes())
    return digest.hexdigest()


class ReportStore:
    """Reports of finished cases in ``folder/faithfulness-cases.jsonl`` (no folder: nothing is kept)."""

    def __init__(self, folder: str | Path | None) -> None:
        self.path = None if folder is None else Path(folder) / FILE_NAME
        self.reports: dict[str, Report] = self._read() if self.path is not None else {}

    def _read(self) -> dict[str, Report]:
        assert self.path is not None
        if not self.path.is_file():
            return {}
        text = self.path.read_text()
        if text and not text.endswith("\n"):  # a line cut short: end it, so the next one starts afresh
            with self.path.open("a") as fh:
                fh.write("\n")
        out = {}
        for line in text.splitlines():
            try:
                entry = json.loads(line)
                out[entry["key"]] = entry["report"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # the last line of a killed run may be cut short
        return out

    def add(self, key: str, report: Report) -> None:
        """Keep ``report`` under ``key``: one line, flushed to disk before the next case."""
        self.reports[key] = report
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps({"key": key, "report": report}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


class ChunkStore:
    """Finished chunks of a report in ``folder/.explain-chunks/<key>.pkl`` (no folder: nothing is kept)."""

    def __init__(self, folder: str | Path | None, settings: Mapping[str, Any]) -> None:
        self.folder = None if folder is None else Path(folder) / CHUNK_DIR
        self.salt = json.dumps(settings, sort_keys=True, default=str)

    def key(self, kind: str, rows: list[int], offset: int) -> str:
        """A digest of a chunk's kind, cases (data rows, first case number) and the report's settings."""
        text = json.dumps({"kind": kind, "rows": rows, "offset": offset, "settings": self.salt}, sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def get(self, key: str) -> Any:
        """The chunk kept under ``key``; None when there is none or its file cannot be read back."""
        if self.folder is None or not (self.folder / f"{key}.pkl").is_file():
            return None
        try:
            with (self.folder / f"{key}.pkl").open("rb") as fh:
                return pickle.load(fh)
        except Exception:  # a file cut short or written by another version: compute the chunk again
            return None

    def put(self, key: str, value: Any) -> None:
        """Keep ``value`` under ``key`` (written whole or not at all)."""
        if self.folder is None:
            return
        with atomic_write(self.folder / f"{key}.pkl", "wb") as fh:
            pickle.dump(value, fh, protocol=pickle.HIGHEST_PROTOCOL)


__all__ = ["CHUNK_DIR", "FILE_NAME", "ChunkStore", "ReportStore", "case_key"]
