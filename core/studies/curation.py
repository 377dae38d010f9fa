"""Finding likely label errors, and exporting curated labels.

Out-of-sample probabilities come from k-fold cross-validation over the training and validation images: each
fold is held out once, a model is trained on the others with the run's config (through `fit`, so everything
is the same as a normal run), and predicts the held-out fold. cleanlab, the reference implementation of confident
learning (Northcutt et al., JAIR 2021), reads them:

- which images are likely mislabeled: cleanlab.filter.find_label_issues (pruning by the estimated noise rates);
- the queue's order: cleanlab.rank.get_label_quality_scores (lowest first; flagged images before the rest);
- how dirty each class is, and into which class: cleanlab.count.estimate_joint, the joint distribution of given
  and true labels, read per given class.
The studio keeps its own code only for the suggested class (the likeliest class other than the given one: cleanlab
flags, it does not suggest) and for the fold bookkeeping around its training.
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

from core.config import CROSSVAL, ConfigError, TrainConfig
from core.infer.evaluate import read_predictions
from core.runs.life import SubReporter, record
from core.train.loop import fit
from core.workspace.files import write_atomic, write_json_atomic
from core.workspace.store import Run, Workspace

LABEL_ISSUES_FILE = "label_issues.json"  # a cross-validation's ranked likely label errors and noise estimate
DEFAULT_FOLDS = 5  # cleanlab's own default for out-of-sample probabilities (cv_n_folds)
METHOD = ("cleanlab: filter.find_label_issues (prune_by_noise_rate), rank.get_label_quality_scores "
          "(self_confidence), count.estimate_joint")

def label_issue_scores(labels: np.ndarray, probs: np.ndarray) -> dict:
    """Scores for each image given its label (ints) and out-of-sample probabilities (N x K), from cleanlab:
    "label_quality" (0 to 1, low: likely wrong), "normalized_margin" (p[given] - max other: negative when the model
    prefers another class), "suggested" (the likeliest other class), "flagged" (cleanlab's find_label_issues),
    "order" (flagged first, each group by label quality, lowest first) and "joint" (K x K estimated P(given = i,
    true = j))."""
    from cleanlab.count import estimate_joint
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(1, keepdims=True)  # written with 6 decimals: cleanlab wants rows that sum to 1
    n, k = probs.shape
    others = probs.copy()
    others[np.arange(n), labels] = -np.inf
    # n_jobs=1: cleanlab would otherwise start a multiprocessing pool from the studio's job thread.
    flagged = find_label_issues(labels, probs, n_jobs=1)
    quality = get_label_quality_scores(labels, probs)
    order = np.lexsort((quality, ~flagged))
    return {"label_quality": quality, "normalized_margin": normalized_margin(labels, probs),
            "self_confidence": probs[np.arange(n), labels], "suggested": others.argmax(1), "flagged": flagged,
            "order": order, "joint": estimate_joint(labels, probs)}


def normalized_margin(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """p[given label] - the largest other p, per image, from -1 to 1: negative where the model prefers another class.
    cleanlab's normalized margin is the same quantity moved to 0..1 ((margin + 1) / 2); the studio shows the margin
    itself, whose sign says which way the model leans."""
    from cleanlab.rank import get_normalized_margin_for_each_label
    labels = np.asarray(labels, dtype=np.int64)
    return 2.0 * get_normalized_margin_for_each_label(labels, np.asarray(probs, dtype=np.float64)) - 1.0


def noise_by_class(joint: np.ndarray, classes: list[str]) -> list[dict]:
    """Per given class, the estimated share of its images whose true class is another one, and which:
    [{"class", "mislabeled", "into": {other class: share of this class's images}}], from the joint P(given, true)."""
    out = []
    for i, name in enumerate(classes):
        row = joint[i]
        total = float(row.sum())
        into = {classes[j]: float(row[j] / total) for j in range(len(classes)) if j != i and total > 0}
        out.append({"class": name, "mislabeled": float(1 - row[i] / total) if total > 0 else 0.0, "into": into})
    return out


def describe_noise(noise: list[dict], at_least: float = 0.005) -> list[str]:
    """Sentences an engineer reads before relabeling: which class is dirty, and into which."""
    lines = []
    for c in sorted(noise, key=lambda c: -c["mislabeled"]):
        for other, share in sorted(c["into"].items(), key=lambda kv: -kv[1]):
            if share >= at_least:
                lines.append(f"about {share:.0%} of the images labelled {c['class']} look like {other}")
    return lines or ["no class looks mislabeled"]


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
        raise ConfigError("folds", "must be between 2 and 10")
    return TrainConfig.from_dict({**cfg.to_dict(), "test_fraction": 0.0,
                                  "extra": {**cfg.extra, "kind": CROSSVAL, "folds": folds}})


def crossval(ws: Workspace, run: Run, reporter, folds: int = DEFAULT_FOLDS) -> dict:
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
    p = np.array([probs[r[0]] for r in known])
    report = write_label_report(run, known, classes, p, folds, split.get("source", ""))
    n_flagged = sum(i["flagged"] for i in report["issues"])
    reporter.log(f"cross-validation done: {n_flagged} likely label errors among {len(known)} images")
    for line in describe_noise(report["noise"]):
        reporter.log(line)
    labels = np.array([classes.index(r[1]) for r in known])
    record(ws, run.id, best_val_acc=float((p.argmax(1) == labels).mean()))  # out-of-fold accuracy
    return {"status": "done", "flagged": n_flagged}


def write_label_report(run: Run, rows: list[list], classes: list[str], probs: np.ndarray, folds: int,
                       source: str) -> dict:
    """oof.csv (each image's out-of-sample probabilities) and label_issues.json (cleanlab's reading of them) in the
    run's folder, for rows of [path, given label, ...] and their probabilities (N x K). Returns the report."""
    labels = np.array([classes.index(r[1]) for r in rows])
    scores = label_issue_scores(labels, probs)

    def write_oof(tmp):
        with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "given"] + [f"p_{c}" for c in classes])
            for r, pr in zip(rows, probs):
                w.writerow([r[0], r[1]] + [f"{x:.6f}" for x in pr])
    write_atomic(run.dir / "oof.csv", write_oof)
    issues = [{"path": rows[i][0], "given": rows[i][1], "suggested": classes[int(scores["suggested"][i])],
               "label_quality": float(scores["label_quality"][i]),
               "self_confidence": float(scores["self_confidence"][i]),
               "normalized_margin": float(scores["normalized_margin"][i]),
               "flagged": bool(scores["flagged"][i]), "dataset": source}
              for i in scores["order"]]
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(confusion, (labels, probs.argmax(1)), 1)
    report = {"classes": classes, "folds": folds, "method": METHOD, "issues": issues,
              "noise": noise_by_class(scores["joint"], classes), "joint": scores["joint"].tolist(),
              "confusion": confusion.tolist()}
    write_json_atomic(run.dir / LABEL_ISSUES_FILE, report, indent=1)
    return report


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


def read_label_report(run: Run) -> dict | None:
    """A cross-validation's label_issues.json: {"classes", "folds", "method", "issues" (ranked), "noise", "joint",
    "confusion"}, or None. A report written before the studio used cleanlab reads as one without a noise estimate,
    its "candidate" images flagged and its normalized margin standing for the label quality."""
    path = run.dir / LABEL_ISSUES_FILE
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    if "method" not in report:
        report["method"] = "the studio's own confident-learning scores (before cleanlab)"
        for issue in report["issues"]:
            issue.setdefault("flagged", issue.get("candidate", False))
            issue.setdefault("label_quality", issue.get("normalized_margin", 0.0))
    report.setdefault("noise", [])
    return report


def read_label_issues(run: Run) -> list[dict]:
    report = read_label_report(run)
    return report["issues"] if report else []


def latest_label_issues(ws: Workspace, source_key: str) -> tuple[str, dict] | None:
    """The newest cross-validation of a dataset (its split's source is `source_key`) that found label issues:
    (its run id, its report: read_label_report), or None."""
    for row in ws.list_runs():  # newest first
        run = ws.run(row["id"])
        if (run.dir / LABEL_ISSUES_FILE).exists() and run.split().get("source") == source_key:
            return run.id, read_label_report(run)
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
