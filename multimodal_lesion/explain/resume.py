"""Finished cases kept on disk as they finish, so that a killed ``mmlesion explain`` resumes without redoing them.

The costly per-case work is the faithfulness curves (:mod:`.faithfulness`). Each finished case's report is
appended to a JSON-lines file in the output folder, under a key made of everything the report depends on:
the case (image id, explained class, its CAM's bytes) and the settings (steps, ROAD percentiles, seed, the
baseline maps, the backend). A rerun into the same folder reads the file and measures only the cases it
does not hold; a line cut short by the kill is skipped. Nothing else is reused: a report whose key differs
is measured again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

Report = dict[str, dict[str, float]]
FILE_NAME = "faithfulness-cases.jsonl"


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


__all__ = ["FILE_NAME", "ReportStore", "case_key"]
