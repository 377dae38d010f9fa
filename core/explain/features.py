"""A run's view of its images: the penultimate-layer features of every image of its split, through the one
inference path (core/infer/classifier.py), cached with the run in features.npz.

The cache is keyed by the best checkpoint (size and modification time) and the split's paths, so it is recomputed
after the run trains on or after a re-split, and never served stale. Near-duplicates by features, nearest
training images and the embedding map read it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from core.workspace.files import load_keyed_npz, save_keyed_npz
from core.workspace.store import Run, Workspace

FEATURES_FILE = "features.npz"


@dataclass
class RunFeatures:
    features: np.ndarray   # N x F float32
    probs: np.ndarray      # N x classes: the model's probabilities (uncalibrated, with the run's TTA)
    classes: list[str]
    paths: list[str]
    labels: list[str]      # class names
    parts: list[str]       # train / val / test

    def part(self, name: str) -> np.ndarray:
        return np.array([i for i, p in enumerate(self.parts) if p == name], dtype=np.int64)


def features_key(run: Run) -> str:
    """What a run's features are computed from: its best checkpoint (size, time) and its split."""
    st = run.best_path.stat()
    h = hashlib.sha1(f"{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(run.split_path.read_bytes())
    return h.hexdigest()


def run_features(ws: Workspace, run: Run, device=None) -> RunFeatures:
    """Features of every readable image of the run's split (train, val, test), from its best checkpoint."""
    from core.errors import UserError
    from core.infer.classifier import Classifier
    from core.models.device import select_device
    from core.runs.rundata import load_run_data
    if not run.best_path.exists():
        raise UserError(f"run {run.id} has no checkpoint yet: train it first")
    key = features_key(run)
    path = run.dir / FEATURES_FILE
    cached = load_keyed_npz(path, key)
    if cached is not None:
        meta = json.loads(str(cached["meta"]))
        return RunFeatures(cached["features"], cached["probs"], meta["classes"], meta["paths"], meta["labels"],
                           meta["parts"])
    clf = Classifier.from_checkpoint(run.best_path, device or select_device(run.config().device))
    data = load_run_data(ws, run, clf.hw, clf.device)
    order = np.concatenate([data.parts[p] for p in ("train", "val", "test")]).astype(np.int64)
    pairs = [clf.features_and_probs(x) for x in data.batches(order, 64, clf.device)]
    features = np.concatenate([f for f, _ in pairs]) if pairs else np.zeros((0, 0), dtype=np.float32)
    probs = np.concatenate([p for _, p in pairs]) if pairs else np.zeros((0, len(data.classes)))
    part_of = {int(i): p for p in ("train", "val", "test") for i in data.parts[p]}
    out = RunFeatures(features, probs, list(data.classes), [data.paths[i] for i in order],
                      [data.classes[data.labels[i]] for i in order], [part_of[int(i)] for i in order])
    meta = json.dumps({"classes": out.classes, "paths": out.paths, "labels": out.labels, "parts": out.parts})
    save_keyed_npz(path, key, meta=np.array(meta), features=features.astype(np.float32), probs=probs)
    return out


# ----------------------------------------------------------------------------------------------------
# Nearest training images (the evidence beside a prediction)

# An image is "unlike anything in training" when its features lie farther (Euclidean) from every training image's
# than those of all but UNLIKE_PERCENTILE % of the validation images (from the same source, not trained on). On ELPV
# (bench/RESULTS.md "Evidence") the cosine of centred features flagged no generated out-of-domain image at any
# useful percentile (their features point the common way, with 4x the norm); the distance at the 95th percentile
# flags 98% of them and 3.6% of the test cells.
UNLIKE_PERCENTILE = 95.0


def _nearest_distance(query: np.ndarray, reference: np.ndarray, chunk: int = 2048) -> np.ndarray:
    ref_sq = (reference.astype(np.float64) ** 2).sum(1)
    out = np.zeros(len(query))
    for start in range(0, len(query), chunk):
        q = query[start:start + chunk].astype(np.float64)
        d2 = (q ** 2).sum(1)[:, None] + ref_sq[None, :] - 2 * q @ reference.T.astype(np.float64)
        out[start:start + chunk] = np.sqrt(np.maximum(d2.min(1), 0))
    return out


@dataclass
class TrainingNeighbours:
    mean: np.ndarray       # F: the training features' mean (similarities are of centred features)
    unit: np.ndarray       # n_train x F, centred and of unit length: for ranking look-alikes
    raw: np.ndarray        # n_train x F as computed: for distances
    paths: list[str]
    labels: list[str]
    threshold: float       # nearest distance beyond which an image is unlike anything in training
    val_distance: np.ndarray  # each validation image's nearest distance (the threshold's evidence)

    def query(self, features: np.ndarray, k: int = 3) -> list[dict]:
        """For each row of features: {"neighbours": [{"path", "label", "similarity"}], "distance", "unlike"}."""
        from core.explain.neighbours import nearest
        f = np.asarray(features, dtype=np.float32)
        idx, sims = nearest(f - self.mean, self.unit, k)
        dist = _nearest_distance(f, self.raw) if len(f) else np.zeros(0)
        return [{"neighbours": [{"path": self.paths[j], "label": self.labels[j], "similarity": float(s)}
                                for j, s in zip(row_i, row_s)],
                 "distance": float(d), "unlike": bool(d > self.threshold)}
                for row_i, row_s, d in zip(idx, sims, dist)]


_NEIGHBOURS: dict[str, tuple[str, TrainingNeighbours]] = {}


def training_neighbours(ws: Workspace, run: Run) -> TrainingNeighbours:
    """The run's training images as a neighbour index, with the "unlike" threshold from its validation part
    (kept in memory per run until its checkpoint or split changes)."""
    from core.errors import UserError
    from core.explain.neighbours import normalize_rows
    if not run.best_path.exists():
        raise UserError(f"run {run.id} has no checkpoint yet: train it first")
    key = features_key(run)
    hit = _NEIGHBOURS.get(str(run.dir))
    if hit and hit[0] == key:
        return hit[1]
    rf = run_features(ws, run)
    train, val = rf.part("train"), rf.part("val")
    if not len(train):
        raise UserError(f"run {run.id} has no readable training image to compare with")
    raw = rf.features[train]
    mean = raw.mean(0)
    val_distance = _nearest_distance(rf.features[val], raw) if len(val) else np.zeros(0)
    threshold = float(np.percentile(val_distance, UNLIKE_PERCENTILE)) if len(val_distance) else float("inf")
    out = TrainingNeighbours(mean, normalize_rows(raw - mean), raw, [rf.paths[i] for i in train],
                             [rf.labels[i] for i in train], threshold, val_distance)
    _NEIGHBOURS[str(run.dir)] = (key, out)
    return out


def outliers(ws: Workspace, run: Run) -> list[dict]:
    """The run's images ranked by their feature distance to the nearest class centre (the mean of each class's
    training features, in units of the class's spread), farthest first: odd images, wrong files, another product in
    the folder. `far`: beyond the validation part's 95th percentile of that distance."""
    rf = run_features(ws, run)
    train = rf.part("train")
    classes = sorted({rf.labels[i] for i in train})
    members = [rf.features[[i for i in train if rf.labels[i] == c]] for c in classes]
    centres = np.stack([m.mean(0) for m in members])
    # In units of each class's own spread (the median distance of its training images to its centre): a class
    # whose images vary a lot (a bright defect of any size) does not make all its members look odd.
    spread = np.array([max(float(np.median(np.linalg.norm(m - c, axis=1))), 1e-6) for m, c in zip(members, centres)])
    f = rf.features.astype(np.float64)
    distance = np.min(np.stack([np.linalg.norm(f - c, axis=1) / s for c, s in zip(centres, spread)]), axis=0)
    val = rf.part("val")
    limit = float(np.percentile(distance[val], UNLIKE_PERCENTILE)) if len(val) else float("inf")
    order = np.argsort(-distance, kind="stable")
    return [{"path": rf.paths[i], "label": rf.labels[i], "part": rf.parts[i], "distance": float(distance[i]),
             "far": bool(distance[i] > limit)} for i in order]
