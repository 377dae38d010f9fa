"""Near-duplicates of a run's images, by perceptual hash and by the run's features, and the groups that
straddle two parts of its split (leakage: a test image that is a training image's twin)."""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from core.data.duplicates import (
    DEFAULT_HASH_DISTANCE,
    HASH_HW,
    describe_groups,
    groups_from_pairs,
    hash_pairs,
    perceptual_hashes,
)
from core.explain.neighbours import DEFAULT_SIMILARITY, feature_pairs


def run_duplicates(ws, run, by: tuple[str, ...] = ("hash",), hash_distance: int = DEFAULT_HASH_DISTANCE,
                   similarity: float = DEFAULT_SIMILARITY) -> dict:
    """The near-duplicate groups of a run's images (by perceptual hash, and by the run's features when `by`
    holds "features": that needs its checkpoint), each with its members' paths, labels and parts, and how many
    groups straddle two parts of the run's split (leakage)."""
    import torch

    from core.errors import UserError
    from core.runs.rundata import load_run_data
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
        from core.explain.features import run_features
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
