"""Finding likely label errors, and exporting curated labels.

Out-of-sample probabilities come from k-fold cross-validation over the training and validation images: each
fold is held out once, a model is trained on the others with the run's config (through `fit`, so everything
is the same as a normal run), and predicts the held-out fold. The probabilities are then ranked with
confident-learning scores (Northcutt et al., JAIR 2021), implemented here in numpy:

- self-confidence: p[given label];
- normalized margin: p[given] - max over other classes of p[other] (negative: the model prefers another class);
- a per-class threshold t_j = mean p_j over images labeled j; an image is a confident off-diagonal candidate when
  some other class j reaches p_j >= t_j and beats the given label.
Images are ranked by normalized margin (lowest first), candidates before the rest.
"""
from __future__ import annotations

import csv
import json
import os
import random
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np

from core.config import CROSSVAL, TrainConfig
from core.infer.evaluate import read_predictions
from core.runs.life import SubReporter, record
from core.train.loop import fit
from core.workspace.files import write_atomic, write_json_atomic
from core.workspace.store import Run, Workspace

LABEL_ISSUES_FILE = "label_issues.json"  # a cross-validation's ranked likely label errors

def label_issue_scores(labels: np.ndarray, probs: np.ndarray) -> dict:
    """Scores for each image given its label (ints) and out-of-sample probabilities (N x K)."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n, k = probs.shape
    self_conf = probs[np.arange(n), labels]
    others = probs.copy()
    others[np.arange(n), labels] = -np.inf
    best_other = others.argmax(1)
    margin = self_conf - others[np.arange(n), best_other]
    thresholds = np.array([probs[labels == j, j].mean() if (labels == j).any() else 1.0 for j in range(k)])
    above = probs >= thresholds[None, :]
    above[np.arange(n), labels] = False
    candidate = above.any(1) & (margin < 0)
    order = np.lexsort((margin, ~candidate))  # candidates first, then by margin, lowest first
    return {"self_confidence": self_conf, "normalized_margin": margin, "suggested": best_other,
            "candidate": candidate, "thresholds": thresholds, "order": order}


def _folds(rows: list[list], k: int, seed: int) -> list[list[int]]:
    """k stratified folds over rows of [path, label, group]."""
    by_label = defaultdict(list)
    for i, r in enumerate(rows):
        by_label[r[1]].append(i)
    rng = random.Random(seed)
    folds = [[] for _ in range(k)]
    for label in sorted(by_label):
        idx = by_label[label]
        rng.shuffle(idx)
        for j, i in enumerate(idx):
            folds[j % k].append(i)
    return folds


def crossval_config(data: str, n_images: int, epochs: int = 8, image_size: int = 128) -> TrainConfig:
    """A quick config for finding label errors: a small model per fold trained from scratch."""
    return TrainConfig(data=data, weights="none", epochs=epochs, image_size=image_size,
                       batch_size=min(32, max(2, n_images // 4)))


def as_crossval(cfg: TrainConfig, folds: int) -> TrainConfig:
    """The config of a k-fold cross-validation run: no test part, so every labeled image gets an
    out-of-sample prediction; the run is marked as a cross-validation (not a model to use)."""
    if not 2 <= folds <= 10:
        raise ValueError("folds must be between 2 and 10")
    return TrainConfig.from_dict({**cfg.to_dict(), "test_fraction": 0.0,
                                  "extra": {**cfg.extra, "kind": CROSSVAL, "folds": folds}})


def crossval(ws: Workspace, run: Run, reporter, folds: int = 4) -> dict:
    """Out-of-sample probabilities for the run's train+val images, and their ranked label-issue scores.
    Writes oof.csv and label_issues.json in the run folder. Returns {"status", ...}."""
    cfg = run.config()
    split = run.split()
    rows = split["train"] + split["val"]
    classes = split["classes"]
    fold_idx = _folds(rows, folds, cfg.split_seed)
    probs: dict[str, list[float]] = {}
    for f in range(folds):
        held = set(fold_idx[f])
        rest = [rows[i] for i in range(len(rows)) if i not in held]
        rng = random.Random(cfg.split_seed + f)
        rng.shuffle(rest)
        n_val = max(len(classes), int(0.1 * len(rest)))
        child = Run(f"{run.id}-fold{f + 1}", run.dir / f"fold{f + 1}")
        child.dir.mkdir(parents=True, exist_ok=True)
        child.write_config(cfg)
        child.split_path.write_text(json.dumps({**split, "train": rest[n_val:], "val": rest[:n_val],
                                                "test": [rows[i] for i in sorted(held)]}))
        result = fit(ws, child, SubReporter(reporter, f"fold {f + 1}/{folds}", f, cfg.epochs, {"fold": f + 1}))
        if result["status"] != "done" and not child.predictions_path.exists():
            return {"status": "stopped"}
        for r in read_predictions(child):
            probs[r["path"]] = [float(r[f"p_{c}"]) for c in classes]
        if result["status"] == "stopped":
            return {"status": "stopped"}
    known = [r for r in rows if r[0] in probs]
    labels = np.array([classes.index(r[1]) for r in known])
    p = np.array([probs[r[0]] for r in known])
    scores = label_issue_scores(labels, p)
    with open(run.dir / "oof.csv", "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "given"] + [f"p_{c}" for c in classes])
        for r, pr in zip(known, p):
            w.writerow([r[0], r[1]] + [f"{x:.6f}" for x in pr])
    issues = [{"path": known[i][0], "given": known[i][1], "suggested": classes[int(scores["suggested"][i])],
               "self_confidence": float(scores["self_confidence"][i]),
               "normalized_margin": float(scores["normalized_margin"][i]),
               "candidate": bool(scores["candidate"][i]), "dataset": split.get("source", "")}
              for i in scores["order"]]
    write_json_atomic(run.dir / LABEL_ISSUES_FILE, {"classes": classes, "folds": folds, "issues": issues}, indent=1)
    n_cand = int(scores["candidate"].sum())
    reporter.log(f"cross-validation done: {n_cand} likely label errors among {len(known)} images")
    record(ws, run.id, best_val_acc=float((p.argmax(1) == labels).mean()))  # out-of-fold accuracy
    return {"status": "done", "candidates": n_cand}


def least_confident(predictor, paths: list[str]) -> list[tuple[str, float]]:
    """(path, top probability) of each readable image, least confident first: the label queue that asks the
    model where it is least sure."""
    preds = predictor.predict(list(paths), top_k=1)
    return sorted(((p["path"], p["top"][0]["prob"]) for p in preds if "top" in p), key=lambda t: t[1])


def review_band(predictor, paths: list[str]) -> list[tuple[str, float]]:
    """(path, decision margin) of each readable image that the model's decision rule sends to a person, nearest the
    decision boundary first: the images the rule will not decide alone. Empty without a rule or a band."""
    if predictor.rule is None or not predictor.rule.has_band:
        return []
    preds = predictor.predict(list(paths), top_k=1)
    hits = [(p["path"], p["decision"]["margin"]) for p in preds if "decision" in p and p["decision"]["review"]]
    return sorted(hits, key=lambda t: t[1])


def read_label_issues(run: Run) -> list[dict]:
    path = run.dir / LABEL_ISSUES_FILE
    if not path.exists():
        return []
    return json.loads(path.read_text())["issues"]


def latest_label_issues(ws: Workspace, source_key: str) -> tuple[str, list[dict]] | None:
    """The newest cross-validation of a dataset (its split's source is `source_key`) that found label issues:
    (its run id, the ranked issues), or None."""
    for row in ws.list_runs():  # newest first
        run = ws.run(row["id"])
        if (run.dir / LABEL_ISSUES_FILE).exists() and run.split().get("source") == source_key:
            return run.id, read_label_issues(run)
    return None


def export_dataset(ds, dest: str | Path, mode: str = "copy") -> dict:
    """Write the (effective-label) dataset as class folders (mode "copy" or "link": hard links, falling
    back to copies across filesystems) or as a labels CSV (mode "csv": dest is the CSV file)."""
    dest = Path(dest)
    if mode == "csv":
        def write(tmp):
            with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
                w = csv.writer(fh)
                w.writerow(["path", "label"])
                for s in ds.samples:
                    w.writerow([os.path.abspath(s.path), ds.classes[s.label]])
        write_atomic(dest, write)
        return {"path": str(dest), "images": len(ds.samples)}
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty: choose a new folder for the export")
    used: set[Path] = set()
    for s in ds.samples:
        folder = dest / ds.classes[s.label]
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / Path(s.path).name
        n = 1
        while target in used or target.exists():
            target = folder / f"{Path(s.path).stem}-{n}{Path(s.path).suffix}"
            n += 1
        used.add(target)
        if mode == "link":
            try:
                os.link(s.path, target)
                continue
            except OSError:
                pass
        shutil.copy2(s.path, target)
    return {"path": str(dest), "images": len(ds.samples)}
