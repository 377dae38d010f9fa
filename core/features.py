"""A run's view of its images: the penultimate-layer features of every image of its split, through the one
inference path (core/inference.py), cached with the run in features.npz.

The cache is keyed by the best checkpoint (size and modification time) and the split's paths, so it is recomputed
after the run trains on or after a re-split, and never served stale. Near-duplicates by features, nearest
training images and the embedding map read it.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .storage import Run, Workspace

FEATURES_FILE = "features.npz"


@dataclass
class RunFeatures:
    features: np.ndarray   # N x F float32
    paths: list[str]
    labels: list[str]      # class names
    parts: list[str]       # train / val / test

    def part(self, name: str) -> np.ndarray:
        return np.array([i for i, p in enumerate(self.parts) if p == name], dtype=np.int64)


def _key(run: Run) -> str:
    st = run.best_path.stat()
    h = hashlib.sha1(f"{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(run.split_path.read_bytes())
    return h.hexdigest()


def run_features(ws: Workspace, run: Run, device=None) -> RunFeatures:
    """Features of every readable image of the run's split (train, val, test), from its best checkpoint."""
    from .device import select_device
    from .errors import UserError
    from .inference import Classifier
    from .rundata import load_run_data
    if not run.best_path.exists():
        raise UserError(f"run {run.id} has no checkpoint yet: train it first")
    key = _key(run)
    path = run.dir / FEATURES_FILE
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["key"]) == key:
                    meta = json.loads(str(z["meta"]))
                    return RunFeatures(z["features"], meta["paths"], meta["labels"], meta["parts"])
        except (OSError, ValueError, KeyError):
            pass  # unreadable or from another version: computed again below
    clf = Classifier.from_checkpoint(run.best_path, device or select_device(run.config().device))
    data = load_run_data(ws, run, clf.hw, clf.device)
    order = np.concatenate([data.parts[p] for p in ("train", "val", "test")]).astype(np.int64)
    feats = [clf.features(x) for x in data.batches(order, 64, clf.device)]
    features = np.concatenate(feats) if feats else np.zeros((0, 0), dtype=np.float32)
    part_of = {int(i): p for p in ("train", "val", "test") for i in data.parts[p]}
    out = RunFeatures(features, [data.paths[i] for i in order], [data.classes[data.labels[i]] for i in order],
                      [part_of[int(i)] for i in order])
    meta = json.dumps({"paths": out.paths, "labels": out.labels, "parts": out.parts})
    tmp = path.with_name(f".{FEATURES_FILE}.{os.getpid()}.tmp.npz")
    try:
        np.savez(tmp, key=np.array(key), meta=np.array(meta), features=features.astype(np.float32))
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)  # a cache: a full disk costs a recomputation next time, nothing else
    return out
