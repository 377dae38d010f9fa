"""Evaluation on the held-out test split: metrics as data, and a per-image table saved with the run."""
from __future__ import annotations

import csv
import json

import numpy as np
import torch

from core.decide.calibration import calibrate
from core.decide.stored import Scores, calibrate_run, load_rule, refit_saved_rule
from core.errors import UserError
from core.infer.classifier import Classifier
from core.models.device import select_device
from core.runs.life import record, skipped_files
from core.runs.rundata import load_run_data
from core.workspace.files import write_atomic, write_json_atomic
from core.workspace.store import Run, Workspace


class EvaluationError(UserError):
    """The run cannot be evaluated (its images are gone, or it has no held-out part); the message says why."""


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Loss, accuracy, per-class precision/recall/F1/support, macro and weighted averages,
    and the confusion matrix (rows: true class, columns: predicted class)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    k = len(classes)
    n = len(y_true)
    y_pred = probs.argmax(1) if n else np.zeros(0, dtype=np.int64)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(1).astype(np.float64)
    predicted = cm.sum(0).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    p_true = np.clip(probs[np.arange(n), y_true], 1e-12, 1.0) if n else np.ones(0)
    weights = support / support.sum() if support.sum() else np.zeros(k)
    present = support > 0  # macro averages over classes that occur in this split
    return {
        "n": int(n),
        "loss": float(-np.log(p_true).mean()) if n else float("nan"),
        "accuracy": float(tp.sum() / n) if n else float("nan"),
        "classes": list(classes),
        "per_class": [{"class": c, "precision": float(precision[i]), "recall": float(recall[i]),
                       "f1": float(f1[i]), "support": int(support[i])} for i, c in enumerate(classes)],
        "macro_precision": float(precision[present].mean()) if present.any() else 0.0,
        "macro_recall": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "weighted_precision": float((precision * weights).sum()),
        "weighted_recall": float((recall * weights).sum()),
        "weighted_f1": float((f1 * weights).sum()),
        "confusion_matrix": cm.tolist(),
    }


def evaluate_run(ws: Workspace, run: Run, data=None, device=None) -> dict:
    """Evaluate the run's best checkpoint on its saved test split (val if it has no test split), through the
    one inference path with the run's precision and TTA. Fits the calibration temperature on the validation part
    (decide.py keeps it and the raw scores), refits a saved decision rule, writes eval.json and predictions.csv
    with calibrated probabilities, records the test accuracy, returns the metrics."""
    clf = Classifier.from_checkpoint(run.best_path, device or select_device(run.config().device))  # raw: T = 1
    if data is None:
        data = load_run_data(ws, run, clf.hw, clf.device, parts=("val", "test"))
    part = "test" if len(data.parts.get("test", [])) else "val"
    if not len(data.parts.get(part, [])):
        gone = len(data.skipped)
        raise EvaluationError(f"run {run.id} has no test or validation image that can be read "
                              f"({gone} could not be, e.g. {data.skipped[0][0]}: {data.skipped[0][1]})" if gone else
                              f"run {run.id} has no test or validation images to evaluate on")
    idx, val_idx = data.parts[part], data.parts.get("val", np.zeros(0, dtype=np.int64))
    raw = clf.probs_of_batches(data.batches(idx, 64, clf.device))
    val_raw = raw if part == "val" else clf.probs_of_batches(data.batches(val_idx, 64, clf.device))
    y = data.labels[idx]
    cal = calibrate_run(run, Scores(data.classes, val_raw, data.labels[val_idx], raw, y, part))
    rule = refit_saved_rule(run)
    probs = calibrate(raw, cal["temperature"])
    metrics = compute_metrics(y, probs, data.classes)
    if run.config().ordinal:  # grades apart, averaged: 0 is perfect, and calling a major defect OK costs 2
        metrics["grade_mae"] = float(np.abs(probs.argmax(1) - y).mean())
    metrics.update({"split": part, "run_id": run.id, "checkpoint_epoch": clf.meta["epoch"],
                    "best_val_acc": clf.meta["best"]["val_acc"] if "best" in clf.meta else None,
                    # "averaged" when weight averaging (ema, swa) validated better than the trained weights
                    "checkpoint_weights": clf.meta.get("best", {}).get("weights", "trained"),
                    "tta": clf.tta, "skipped": skipped_files(run.skipped()),
                    "temperature": cal["temperature"], "ece_before": cal["ece_before"], "ece_after": cal["ece_after"],
                    "loss_uncalibrated": cal["nll_before"]})
    _write_predictions(run, [data.paths[i] for i in idx], y, probs, data.classes, rule)
    write_json_atomic(run.eval_path, metrics)
    record(ws, run.id, test_acc=metrics["accuracy"])
    score_golden(ws, run, clf)
    return metrics


GOLDEN_FIELDS = ["sha256", "path", "true", "predicted", "correct", "decision"]  # then p_<class> per class


def score_golden(ws: Workspace, run: Run, clf: Classifier | None = None) -> dict | None:
    """Score the run on its dataset's golden set (core/data/golden.py) as it is now, through the one inference path
    with the run's temperature and saved rule: golden.json (metrics, the rule's report, the set's version, how many
    golden images the run trained or validated on, which would flatter it) and golden.csv (per image, by SHA-256,
    for the release gate's paired comparison). Records the golden accuracy in the index. None without a golden set."""
    from core.data.golden import GoldenStore, file_digests
    split = run.split()
    dataset, classes = split.get("source", ""), split["classes"]
    store = GoldenStore(ws)
    if not store.images(dataset):
        return None
    version = store.version(dataset)
    clf = clf or Classifier.from_checkpoint(run.best_path, select_device(run.config().device))
    gi = golden_images(ws, run, clf.hw)
    found, missing, unknown, golden_ok, y = gi["found"], gi["missing"], gi["unknown"], gi["ok"], gi["y"]
    batches = (torch.from_numpy(np.ascontiguousarray(gi["images"][s:s + 64])) for s in range(0, len(y), 64))
    probs = calibrate(clf.probs_of_batches(batches), run.temperature())
    rule = load_rule(run)
    report_ = None
    if rule is not None and len(y):
        from core.decide.rule import report
        report_ = report(rule, probs, y)
    seen = [r[0] for part in ("train", "val") for r in split.get(part, [])]
    trained_on = len({g.sha256 for g in found} & set(file_digests(ws, seen).values())) if seen else 0
    out = {"run_id": run.id, "version": version, **compute_metrics(y, probs, classes),
           "missing": [g.path for g in missing], "unreadable": gi["failed"],
           "unknown_class": [[g.path, g.label] for g in unknown], "trained_on": trained_on,
           "rule": report_, "temperature": run.temperature()}
    verdicts = rule.verdicts(probs) if rule is not None and len(y) else [""] * len(y)
    pred = probs.argmax(1) if len(y) else np.zeros(0, dtype=np.int64)

    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
            w = csv.writer(fh)
            w.writerow(GOLDEN_FIELDS + [f"p_{c}" for c in classes])
            for i, im in enumerate(golden_ok):
                w.writerow([im.sha256, im.path, im.label, classes[pred[i]], int(pred[i] == y[i]), verdicts[i]]
                           + [f"{p:.6f}" for p in probs[i]])
    write_atomic(run.golden_predictions_path, write)
    write_json_atomic(run.golden_path, out)
    record(ws, run.id, golden_acc=out["accuracy"] if len(y) else None, golden_version=version)
    return out


def golden_images(ws: Workspace, run: Run, hw: tuple[int, int]) -> dict:
    """The run's dataset's golden images as the model gets them: "images" (N x H x W x 3 uint8) and "y" for the
    "ok" ones (in the run's classes, decodable), and the rest: "missing" (bytes found nowhere), "unknown" (a class
    the run was not trained on), "failed" ([path, reason] that could not be decoded). Empty without a golden set."""
    from core.data.cache import IMAGE_CACHE
    from core.data.golden import GoldenStore
    from core.data.sources import DatasetError, load_dataset
    split = run.split()
    dataset, classes = split.get("source", ""), split["classes"]
    store = GoldenStore(ws)
    found, missing = [], []
    if store.images(dataset):
        try:  # the golden images are found by their bytes among the dataset's files and where each was last seen
            candidates = [s.path for s in load_dataset(dataset).samples]
        except (DatasetError, OSError):
            candidates = []
        found, missing = store.resolve(dataset, candidates)
    unknown = [g for g in found if g.label not in classes]
    known = [g for g in found if g.label in classes]
    decoded = IMAGE_CACHE.get([g.path for g in known], hw, ws.cache_dir) if known else None
    failed = decoded.failed if decoded else {}
    keep = np.array([i for i in range(len(known)) if i not in failed], dtype=np.int64)
    return {"found": found, "missing": missing, "unknown": unknown,
            "failed": [[known[i].path, r] for i, r in failed.items()],
            "ok": [known[i] for i in keep], "y": np.array([classes.index(known[i].label) for i in keep], dtype=np.int64),
            "images": decoded.array[keep] if decoded else np.zeros((0, *hw, 3), dtype=np.uint8)}


def read_golden(run: Run) -> tuple[dict | None, list[dict]]:
    """A run's golden-set score and per-image rows (None, [] when it was never scored on one)."""
    if not run.golden_path.exists():
        return None, []
    summary = json.loads(run.golden_path.read_text())
    rows = []
    if run.golden_predictions_path.exists():
        with open(run.golden_predictions_path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
            rows = list(csv.DictReader(fh))
    return summary, rows


def _write_predictions(run: Run, paths, y, probs, classes, rule=None) -> None:
    """The per-image table: calibrated probabilities, and the saved rule's decision when there is one."""
    pred = probs.argmax(1) if len(probs) else np.zeros(0, dtype=np.int64)
    verdicts = rule.verdicts(probs) if rule is not None and len(probs) else [""] * len(paths)
    p_true = np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0) if len(y) else np.zeros(0)
    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "true", "predicted", "confidence", "loss", "correct", "decision"]
                       + [f"p_{c}" for c in classes])
            for i, path in enumerate(paths):
                w.writerow([path, classes[y[i]], classes[pred[i]], f"{probs[i, pred[i]]:.6f}",
                            f"{-np.log(p_true[i]):.6f}", int(pred[i] == y[i]), verdicts[i]]
                           + [f"{p:.6f}" for p in probs[i]])
    write_atomic(run.predictions_path, write)


def read_predictions(run: Run) -> list[dict]:
    """The per-image table of a run's evaluation (empty if not evaluated)."""
    if not run.predictions_path.exists():
        return []
    with open(run.predictions_path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["confidence"] = float(r["confidence"])
        r["loss"] = float(r["loss"])
        r["correct"] = r["correct"] == "1"
        r.setdefault("decision", "")  # tables written before decisions existed
    return rows


def write_decisions(run: Run) -> None:
    """Rewrite the predictions table's decision column after the rule changed (no model needed: the table holds
    the calibrated probabilities)."""
    rows = read_predictions(run)
    if not rows:
        return
    rule = load_rule(run)
    classes = run.split()["classes"]
    probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    y = np.array([classes.index(r["true"]) for r in rows])
    _write_predictions(run, [r["path"] for r in rows], y, probs, classes, rule)


def gallery(run: Run, true: str | None = None, predicted: str | None = None) -> list[dict]:
    """The images of a confusion-matrix selection, highest loss first. A diagonal cell (true == predicted) holds
    that class's correct predictions; any other selection (a cell, a row, a column, or none) the wrong ones."""
    diagonal = true is not None and true == predicted
    rows = [r for r in read_predictions(run) if r["correct"] == diagonal]
    if true is not None:
        rows = [r for r in rows if r["true"] == true]
    if predicted is not None:
        rows = [r for r in rows if r["predicted"] == predicted]
    return sorted(rows, key=lambda r: -r["loss"])
