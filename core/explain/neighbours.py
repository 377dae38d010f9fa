"""Nearest neighbours and similar pairs by cosine similarity of feature rows (pure numpy)."""
from __future__ import annotations

import numpy as np

DEFAULT_SIMILARITY = 0.99   # cosine of centred penultimate features
_CHUNK = 2048               # rows compared at once: 2048 x 20,000 pairs is about 40 MB per step



def normalize_rows(features: np.ndarray) -> np.ndarray:
    f = np.asarray(features, dtype=np.float32)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def feature_pairs(features: np.ndarray, min_similarity: float) -> list[tuple[int, int, float]]:
    """(i, j, cosine similarity) for every i < j at least `min_similarity` alike."""
    f = normalize_rows(features)
    out = []
    for start in range(0, len(f), _CHUNK):
        sim = f[start:start + _CHUNK] @ f.T
        ii, jj = np.nonzero(sim >= min_similarity)
        ii = ii + start
        keep = ii < jj
        out.extend(zip(ii[keep].tolist(), jj[keep].tolist(), sim[ii[keep] - start, jj[keep]].tolist()))
    return out


def nearest(query: np.ndarray, reference: np.ndarray, k: int, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Indices into `reference` of each query row's k most similar rows (cosine), and those similarities.
    `exclude_self`: query and reference are the same rows; a row is not its own neighbour."""
    q, r = normalize_rows(query), normalize_rows(reference)
    k = min(k, len(r) - (1 if exclude_self else 0))
    idx = np.zeros((len(q), max(k, 0)), dtype=np.int64)
    sims = np.zeros((len(q), max(k, 0)), dtype=np.float32)
    if k <= 0:
        return idx, sims
    for start in range(0, len(q), _CHUNK):
        sim = q[start:start + _CHUNK] @ r.T
        if exclude_self:
            rows = np.arange(len(sim))
            sim[rows, rows + start] = -np.inf
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        top_sim = np.take_along_axis(sim, top, 1)
        order = np.argsort(-top_sim, axis=1, kind="stable")
        idx[start:start + len(sim)] = np.take_along_axis(top, order, 1)
        sims[start:start + len(sim)] = np.take_along_axis(top_sim, order, 1)
    return idx, sims
