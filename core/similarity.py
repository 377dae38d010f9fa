"""Near-duplicates, split leakage and nearest neighbours.

Two images are near-duplicates when their perceptual hashes (a 64-bit DCT hash of the 32x32 gray image: the same
picture re-saved, re-compressed, resized or slightly shifted) differ in at most `hash_distance` bits, or, for a
trained run, when the model's penultimate-layer features point the same way (cosine similarity at least
`similarity`). Pairs are joined into groups (connected components). A group whose members fall in different parts
of a split (train / val / test) leaks: the model is tested on an image it was trained on, and the test accuracy is
inflated. `stratified_split(..., together=groups)` (core/data.py) keeps each group on one side.

Pure numpy over arrays: the images come from the decoded-image cache, the features from core/inference.py.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from .config import TrainConfig

HASH_HW = (32, 32)
DEFAULT_HASH_DISTANCE = TrainConfig.duplicate_distance  # bits of 64: the split's default is the report's
DEFAULT_SIMILARITY = 0.99   # cosine of centred penultimate features
_CHUNK = 2048               # rows compared at once: 2048 x 20,000 pairs is about 40 MB per step


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m


_DCT = _dct_matrix(HASH_HW[0])
_BITS = (1 << np.arange(64, dtype=np.uint64)).astype(np.uint64)


def perceptual_hashes(images_u8: np.ndarray) -> np.ndarray:
    """64-bit pHash of each NxHxWx3 uint8 image (H = W = 32: decode at HASH_HW): the 8x8 lowest frequencies of
    the gray image's DCT, each bit whether it is above their median (the DC term left out of the median)."""
    if len(images_u8) == 0:
        return np.zeros(0, dtype=np.uint64)
    gray = images_u8.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    coeffs = _DCT @ gray @ _DCT.T                      # N x 32 x 32
    low = coeffs[:, :8, :8].reshape(len(gray), 64)
    median = np.median(low[:, 1:], axis=1, keepdims=True)
    bits = (low > median).astype(np.uint64)
    return (bits * _BITS).sum(axis=1, dtype=np.uint64)


def hash_pairs(hashes: np.ndarray, max_distance: int) -> list[tuple[int, int, float]]:
    """(i, j, distance in bits) for every i < j whose hashes differ in at most `max_distance` bits."""
    out = []
    n = len(hashes)
    for start in range(0, n, _CHUNK):
        block = hashes[start:start + _CHUNK]
        dist = np.bitwise_count(block[:, None] ^ hashes[None, :])
        ii, jj = np.nonzero(dist <= max_distance)
        ii = ii + start
        keep = ii < jj
        out.extend(zip(ii[keep].tolist(), jj[keep].tolist(), dist[ii[keep] - start, jj[keep]].tolist()))
    return out


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


def groups_from_pairs(n: int, pairs) -> list[list[int]]:
    """Connected components of size 2 or more, each sorted, ordered by their first member."""
    parent = list(range(n))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, *_ in pairs:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    members = defaultdict(list)
    for i in range(n):
        members[root(i)].append(i)
    return sorted((g for g in members.values() if len(g) > 1), key=lambda g: g[0])


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


def describe_groups(groups: list[list[int]], paths: list[str], labels: list[str], parts: list[str]) -> list[dict]:
    """Each group as members (path, label, part), the parts it spans, whether it straddles two or more of them
    (leakage) and whether its members disagree on the label (a labelling error or an ambiguous image)."""
    out = []
    for g in groups:
        spans = sorted({parts[i] for i in g})
        out.append({"members": [{"path": paths[i], "label": labels[i], "part": parts[i]} for i in g],
                    "parts": spans, "straddles": len(spans) > 1,
                    "labels_disagree": len({labels[i] for i in g}) > 1})
    return out


# ----------------------------------------------------------------------------------------------------
# Over a dataset (for a split) and over a run


def dataset_duplicate_groups(ds, hash_distance: int = DEFAULT_HASH_DISTANCE, cache_dir=None) -> list[list[int]]:
    """Near-duplicate groups (sample indices) of a dataset by perceptual hash, for a split that keeps each group
    on one side. Images that cannot be decoded are in no group."""
    from .data import IMAGE_CACHE
    decoded = IMAGE_CACHE.get([s.path for s in ds.samples], HASH_HW, cache_dir)
    ok = np.array([i for i in range(len(ds.samples)) if i not in decoded.failed], dtype=np.int64)
    hashes = perceptual_hashes(np.asarray(decoded.array)[ok])
    return [[int(ok[i]) for i in g] for g in groups_from_pairs(len(ok), hash_pairs(hashes, hash_distance))]


def run_duplicates(ws, run, by: tuple[str, ...] = ("hash",), hash_distance: int = DEFAULT_HASH_DISTANCE,
                   similarity: float = DEFAULT_SIMILARITY) -> dict:
    """The near-duplicate groups of a run's images (by perceptual hash, and by the run's features when `by`
    holds "features": that needs its checkpoint), each with its members' paths, labels and parts, and how many
    groups straddle two parts of the run's split (leakage)."""
    import torch
    from .errors import UserError
    from .rundata import load_run_data
    unknown = set(by) - {"hash", "features"}
    if unknown or not by:
        raise UserError(f"near-duplicates by {', '.join(sorted(unknown)) or 'nothing'}: use hash and/or features")
    if not 0 <= hash_distance <= 64:
        raise UserError(f"hash distance {hash_distance} is not a number of bits between 0 and 64")
    if not -1 <= similarity <= 1:
        raise UserError(f"similarity {similarity} is not a cosine similarity between -1 and 1")
    data = load_run_data(ws, run, HASH_HW, torch.device("cpu"))
    order = np.concatenate([data.parts[p] for p in ("train", "val", "test")]).astype(np.int64)
    paths = [data.paths[i] for i in order]
    labels = [data.classes[data.labels[i]] for i in order]
    part_of = {int(i): p for p in ("train", "val", "test") for i in data.parts[p]}
    parts = [part_of[int(i)] for i in order]
    pairs = []
    if "hash" in by:
        hashes = perceptual_hashes(np.asarray(data.images)[data.rows[order]])
        pairs += hash_pairs(hashes, hash_distance)
    if "features" in by:
        from .features import run_features
        rf = run_features(ws, run)
        where = {p: k for k, p in enumerate(paths)}
        mine = np.array([where.get(p, -1) for p in rf.paths])
        # Centred on the training images' mean: features after a ReLU all point into one orthant, so that raw
        # cosines of unrelated images are already above 0.95.
        centred = rf.features - rf.features[rf.part("train")].mean(0)
        for i, j, s in feature_pairs(centred, similarity):
            if mine[i] >= 0 and mine[j] >= 0:
                pairs.append((int(min(mine[i], mine[j])), int(max(mine[i], mine[j])), s))
    groups = describe_groups(groups_from_pairs(len(paths), pairs), paths, labels, parts)
    straddling = [g for g in groups if g["straddles"]]
    spans = defaultdict(int)
    for g in straddling:
        spans["+".join(g["parts"])] += 1
    return {"run_id": run.id, "by": list(by), "hash_distance": hash_distance,
            "similarity": similarity if "features" in by else None, "n_images": len(paths),
            "n_groups": len(groups), "n_images_in_groups": sum(len(g["members"]) for g in groups),
            "n_straddling": len(straddling), "straddling_by_parts": dict(spans),
            "n_labels_disagree": sum(g["labels_disagree"] for g in groups), "groups": groups}
