"""Which cases a report explains: a correct case per class, then the run's errors and least confident cases.

A report of easy cases only hides what a reader most needs to see. From the displayed probabilities
of every case of the split: one correct case per true class (drawn at random, seeded), then the
errors (most confident first) alternating with the least confident cases, until ``n``; where the
split has too few of those, the rest are drawn round-robin over the true classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CORRECT, ERROR, LEAST_CONFIDENT, SAMPLE, NAMED = "correct", "error", "least confident", "sample", "named"


def _correct_per_class(truth: np.ndarray, pred: np.ndarray, n_classes: int, rng: np.random.Generator) -> list[int]:
    """Positions of one correct prediction per true class (classes without one are skipped)."""
    picked = []
    for k in range(n_classes):
        hits = np.flatnonzero((truth == k) & (pred == k))
        if len(hits):
            picked.append(int(rng.choice(hits)))
    return picked


def _alternate(queues: Sequence[Sequence[tuple[int, str]]], taken: set[int], n: int) -> list[tuple[int, str]]:
    """Take from the queues in turn, skipping positions already taken, until ``n`` or all are empty."""
    out: list[tuple[int, str]] = []
    iters = [iter(q) for q in queues]
    while len(out) < n and iters:
        for it in list(iters):
            item = next((x for x in it if x[0] not in taken), None)
            if item is None:
                iters.remove(it)
                continue
            taken.add(item[0])
            out.append(item)
            if len(out) == n:
                break
    return out


def select_by_outcome(truth: np.ndarray, probs: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Positions (into ``truth`` / ``probs``) of ``n`` cases to explain and why each was picked.

    Args:
        truth: true class index of every case of the split (N,).
        probs: displayed class probabilities (N, C).
        n: how many cases.
        seed: seed of the draws.
    """
    rng = np.random.default_rng(seed)
    n = min(n, len(truth))
    pred, conf = probs.argmax(1), probs.max(1)
    chosen = [(i, CORRECT) for i in _correct_per_class(truth, pred, probs.shape[1], rng)][:n]
    taken = {i for i, _ in chosen}
    errors = [(int(i), ERROR) for i in np.flatnonzero(pred != truth)[np.argsort(-conf[pred != truth], kind="stable")]]
    unsure = [(int(i), LEAST_CONFIDENT) for i in np.argsort(conf, kind="stable")]
    chosen += _alternate([errors, unsure], taken, n - len(chosen))
    by_class = [[(int(i), SAMPLE) for i in rng.permutation(np.flatnonzero(truth == k))] for k in range(probs.shape[1])]
    chosen += _alternate(by_class, taken, n - len(chosen))
    return np.asarray([i for i, _ in chosen], dtype=np.int64), [why for _, why in chosen]


__all__ = ["CORRECT", "ERROR", "LEAST_CONFIDENT", "NAMED", "SAMPLE", "select_by_outcome"]
