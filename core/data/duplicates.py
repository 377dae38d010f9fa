"""Near-duplicate images by perceptual hash, grouped, for a split that keeps each group on one side.

Two images are near-duplicates when their perceptual hashes (a 64-bit DCT hash of the 32x32 gray image: the same
picture re-saved, re-compressed, resized or slightly shifted) differ in at most `hash_distance` bits. Pairs are
joined into groups (connected components). A group whose members fall in different parts of a split (train / val /
test) leaks: the model is tested on an image it was trained on, and the test accuracy is inflated.
`stratified_split(..., together=groups)` (core/data/split.py) keeps each group on one side; a trained run's
leakage report, by hash and by its features, is core/explain/leakage.py.

Pure numpy over arrays: the images come from the decoded-image cache (core/data/cache.py).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from core.config import TrainConfig

HASH_HW = (32, 32)
DEFAULT_HASH_DISTANCE = TrainConfig.duplicate_distance  # bits of 64: the split's default is the report's
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
    from core.data.cache import IMAGE_CACHE
    decoded = IMAGE_CACHE.get([s.path for s in ds.samples], HASH_HW, cache_dir)
    ok = np.array([i for i in range(len(ds.samples)) if i not in decoded.failed], dtype=np.int64)
    hashes = perceptual_hashes(np.asarray(decoded.array)[ok])
    return [[int(ok[i]) for i in g] for g in groups_from_pairs(len(ok), hash_pairs(hashes, hash_distance))]
