"""Case pages of a long explanation report, drawn and written as each chunk of cases finishes.

``mmlesion explain`` computes its cases a chunk at a time (``explain.pipeline.explain_run``'s
``on_chunk``). :class:`CasePages` draws each finished chunk's figures and writes its pages: in this
process for a short report, in one worker process for a long one, so that the next chunk's maps and
curves are computed while the figures of the last one are drawn (matplotlib holds the interpreter; the
worker has a core of its own). A chunk drawn before (a resumed run) is not drawn again: a small record
beside its figures names the chunk's content (a digest of its cases as drawn) and the files.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..explain.pipeline import ShapRows
from ..explain.results import CaseExplanation
from ..io import atomic_write
from .explanations import draw_case_figures
from .html import ClassVocabulary, write_case_pages

Drawn = dict[str, dict[str, Path | None]]
RECORDS = Path("cases") / "assets" / ".drawn"
MAX_PENDING = 2  # chunks queued for the worker before the explaining process waits (memory stays flat)
WORKER_NICE = 10  # the drawing yields the cores to the computation, which the next chunk waits on


@dataclass
class PageJob:
    """One finished chunk to draw and write: its cases and SHAP rows, all of the report's ids, the classes."""

    out: Path
    cases: list[CaseExplanation]
    shap: ShapRows | None
    ids: list[str]
    offset: int
    classes: list[str]
    class_names: dict[str, str]

    def digest(self) -> str:
        """What the chunk's figures and pages show, as a digest (the cases, their SHAP rows, their place)."""
        h = hashlib.blake2b(digest_size=16)
        place = {"ids": self.ids, "offset": self.offset, "classes": self.classes, "names": self.class_names}
        h.update(json.dumps(place, sort_keys=True).encode())
        for case in self.cases:
            h.update(json.dumps(case.to_json(), sort_keys=True, default=str).encode())
            for array in (
                case.pixels,
                case.original_pixels,
                case.cam,
                case.runner_up_cam,
                case.mask,
                case.cam_without_metadata,
                *case.age_cams.values(),
            ):
                h.update(b"-" if array is None else np.ascontiguousarray(array).tobytes())
        if self.shap is not None:
            for part in (self.shap.values, self.shap.base_values, self.shap.data, self.shap.error_std):
                h.update(json.dumps(None if part is None else np.asarray(part).tolist(), default=str).encode())
            h.update(json.dumps(self.shap.feature_names).encode())
        return h.hexdigest()


def draw_and_write(job: PageJob) -> tuple[Drawn, float]:
    """Draw the chunk's figures and write its pages; returns the figures and the seconds it took."""
    t = time.perf_counter()
    drawn = draw_case_figures(job.out, job.cases, None if job.shap is None else ShapRows.joined([job.shap]))
    vocab = ClassVocabulary(tuple(job.classes), job.class_names)
    write_case_pages(job.out, job.cases, drawn, job.ids, job.offset, vocab)
    _write_record(job, drawn)
    return drawn, time.perf_counter() - t


def _record_path(job: PageJob) -> Path:
    return job.out / RECORDS / f"{job.digest()}.json"


def _write_record(job: PageJob, drawn: Drawn) -> None:
    """Note that this chunk's content is drawn, and where (read back by a resumed run)."""
    files = {i: {k: None if v is None else str(v) for k, v in f.items()} for i, f in drawn.items()}
    with atomic_write(_record_path(job)) as fh:
        json.dump(files, fh)


def drawn_before(job: PageJob) -> Drawn | None:
    """The figures of a chunk with this very content drawn by an earlier run, if every file is still there."""
    path = _record_path(job)
    try:
        files = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    drawn = {i: {k: None if v is None else Path(v) for k, v in f.items()} for i, f in files.items()}
    complete = {c.image_id for c in job.cases} <= drawn.keys()
    return drawn if complete and all(p is None or p.is_file() for f in drawn.values() for p in f.values()) else None


class CasePages:
    """``explain_run``'s ``on_chunk`` for the HTML report: each finished chunk's figures and pages.

    ``prepare(cases)`` runs first in this process (the prediction sets and shift alarm the pages show).
    With ``parallel`` the drawing goes to one worker process (spawned on the first chunk) while the
    caller computes the next chunk, except the report's last chunk, which this process draws beside the
    worker's last ones (nothing is left to compute); :meth:`finish` waits for the worker and returns every
    case's figures.
    ``seconds`` sums the drawing and writing, ``here`` the part of it done in this process (the rest was
    in the worker, overlapped), ``waited`` the time this process spent waiting for the worker.
    """

    def __init__(self, out: str | Path, prepare: Any = None, parallel: bool = False) -> None:
        self.out, self.prepare, self.parallel = Path(out), prepare, parallel
        self.drawn: Drawn = {}
        self.seconds = self.waited = self.here = 0.0
        self.reused = 0  # chunks whose figures an earlier run had drawn
        self._pool: ProcessPoolExecutor | None = None
        self._pending: deque[Future[tuple[Drawn, float]]] = deque()

    def write(self, view: Any) -> None:
        """Draw and write a finished chunk (an ``explain.pipeline.ChunkView``), or queue it for the worker."""
        if self.prepare is not None:
            self.prepare(view.cases)
        job = PageJob(self.out, view.cases, view.shap, view.ids, view.offset, view.classes, view.class_names)
        before = drawn_before(job)
        if before is not None:
            self.drawn.update(before)
            self.reused += 1
        elif not self.parallel or view.offset + len(view.cases) >= len(view.ids):
            # the last chunk is drawn here, beside the worker's last ones: the computation is over
            drawn, seconds = draw_and_write(job)
            self.here += seconds
            self._collect((drawn, seconds))
        else:
            self._pending.append(self._worker().submit(draw_and_write, job))
            while len(self._pending) > MAX_PENDING or (self._pending and self._pending[0].done()):
                self._wait_oldest()

    def finish(self) -> Drawn:
        """Wait for the worker's last chunks; every case's figures (image id -> name -> file)."""
        try:
            while self._pending:
                self._wait_oldest()
        finally:
            self.close()
        return self.drawn

    def close(self) -> None:
        """Stop the worker (after an error too: nothing is left running)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _worker(self) -> ProcessPoolExecutor:
        if self._pool is None:  # spawn: the explaining process holds torch / OpenVINO threads a fork would copy
            context = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(1, mp_context=context, initializer=os.nice, initargs=(WORKER_NICE,))
        return self._pool

    def _wait_oldest(self) -> None:
        t = time.perf_counter()
        result = self._pending.popleft().result()  # a worker's error is raised here, in order
        self.waited += time.perf_counter() - t
        self._collect(result)

    def _collect(self, result: tuple[Drawn, float]) -> None:
        drawn, seconds = result
        self.drawn.update(drawn)
        self.seconds += seconds


__all__ = ["CasePages", "PageJob", "draw_and_write", "drawn_before"]
