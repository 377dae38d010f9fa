"""The embedding map: every image of a run as a point, placed by the model's penultimate-layer features (from
core/explain/features.py) projected to two dimensions, with what to colour it by.

PCA is exact and instant; t-SNE (scikit-learn) and UMAP (umap-learn, when installed) keep neighbourhoods better
and take longer: bench/embedding_map.py measures them at 2,600 and 20,000 images (bench/RESULTS.md). A map is
cached with the run per method, next to the features it was computed from.
"""
from __future__ import annotations

import numpy as np

from core.errors import UserError
from core.workspace.files import load_keyed_npz, save_keyed_npz
from core.workspace.store import Run, Workspace

METHODS = ("pca", "tsne", "umap")


def _pca(x: np.ndarray, dims: int) -> np.ndarray:
    x = x - x.mean(0)
    # eigenvectors of the F x F covariance: cheaper than an SVD of the N x F matrix when N >> F
    values, vectors = np.linalg.eigh(x.T @ x)
    top = vectors[:, np.argsort(values)[::-1][:dims]]
    top *= np.where(top[np.abs(top).argmax(0), np.arange(top.shape[1])] < 0, -1, 1)  # a sign that does not flip
    return x @ top


def project(features: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """N x 2 float32 coordinates of N feature rows."""
    if method not in METHODS:
        raise UserError(f"unknown map method {method!r}: use one of {', '.join(METHODS)}")
    x = np.asarray(features, dtype=np.float64)
    n = len(x)
    if n < 3:
        return np.zeros((n, 2), dtype=np.float32) if n < 2 else _pca(x, 2).astype(np.float32)
    if method == "pca":
        return _pca(x, 2).astype(np.float32)
    # Both neighbour methods start from the first 50 principal components (their documented practice: it drops
    # noise and makes the neighbour search 10x cheaper at 512 dimensions).
    reduced = _pca(x, min(50, x.shape[1], n - 1)).astype(np.float32)
    if method == "tsne":
        from sklearn.manifold import TSNE
        return TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), init="pca", random_state=seed,
                    n_jobs=None).fit_transform(reduced).astype(np.float32)
    try:
        import umap
    except ImportError:
        raise UserError("the UMAP map needs umap-learn: .venv/bin/pip install umap-learn (or use pca or tsne)") from None
    return umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), random_state=seed).fit_transform(
        reduced).astype(np.float32)


def run_map(ws: Workspace, run: Run, method: str = "pca") -> dict:
    """The map of a run's images: {"x", "y", "path", "label", "predicted", "confidence", "correct", "part",
    "label_doubt"} as equal-length lists. label_doubt is the normalized margin of the given label (negative: the
    model prefers another class; core/studies/curation.py), from the run's own probabilities, so in-sample for the
    training images."""
    from core.explain.features import features_key, run_features
    from core.studies.curation import normalized_margin
    rf = run_features(ws, run)
    path = run.dir / f"map-{method}.npz"
    key = features_key(run)
    cached = load_keyed_npz(path, key)
    xy = cached["xy"] if cached is not None else None
    if xy is None:
        xy = project(rf.features, method)
        save_keyed_npz(path, key, xy=xy)
    index = {c: i for i, c in enumerate(rf.classes)}
    labels = np.array([index[label] for label in rf.labels], dtype=np.int64)
    predicted = rf.probs.argmax(1) if len(rf.probs) else np.zeros(0, dtype=np.int64)
    doubt = normalized_margin(labels, rf.probs) if len(labels) else np.zeros(0)
    return {"x": xy[:, 0].tolist(), "y": xy[:, 1].tolist(), "path": rf.paths, "label": rf.labels,
            "predicted": [rf.classes[i] for i in predicted],
            "confidence": rf.probs.max(1).tolist() if len(rf.probs) else [],
            "correct": (predicted == labels).tolist(), "part": rf.parts, "label_doubt": np.asarray(doubt).tolist(),
            "method": method, "classes": rf.classes}

