"""How many more images each class needs: a learning curve of a run's recipe.

The job trains the run's own recipe (through `fit`, like any run) on nested, stratified 25%, 50%, 75% and 100% of
its training part, keeping its validation part for choosing each checkpoint and scoring each on its test part (the
validation part when it has none). Per class, the error on the held-out part against the number of that class's
training images is fitted with a power law, err = a * n^-b (a line in log-log; Hestness et al. 2017 find deep
nets follow one over a wide range), and read off at more images: "about N more images of class C would bring its
error from x% to y%", with an interval from the fit's own uncertainty. Four points make a rough fit: the interval
says how rough.
"""
from __future__ import annotations

import json
import math
import random
from collections import defaultdict

import numpy as np

from core.config import LEARNING_CURVE, TrainConfig
from core.infer.evaluate import read_predictions
from core.runs.life import SubReporter, record
from core.train.loop import fit
from core.workspace.files import write_json_atomic
from core.workspace.store import Run, Workspace

FRACTIONS = (0.25, 0.5, 0.75, 1.0)
# Student's t at 90% two-sided for the fit's degrees of freedom (n points - 2); beyond 5: the normal's 1.645
T90 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015}


def fit_power_law(n: np.ndarray, err: np.ndarray) -> dict:
    """Least squares of log err = log a - b log n. Returns a, b, their standard errors, the residual variance and
    the covariance of (log a, b), for `power_law_at`. Errors of 0 must be replaced before (see `floor_errors`)."""
    x, y = np.log(np.asarray(n, dtype=float)), np.log(np.asarray(err, dtype=float))
    if len(x) < 2 or np.ptp(x) == 0:
        raise ValueError("a power law needs at least two different sizes")
    X = np.stack([np.ones_like(x), -x], 1)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    dof = len(x) - 2
    resid = y - X @ coef
    s2 = float(resid @ resid / dof) if dof > 0 else 0.0
    cov = s2 * np.linalg.inv(X.T @ X)
    return {"a": float(math.exp(coef[0])), "b": float(coef[1]), "log_a": float(coef[0]),
            "se_log_a": float(math.sqrt(cov[0, 0])), "se_b": float(math.sqrt(cov[1, 1])), "dof": dof,
            "cov": cov.tolist()}


def power_law_at(fit: dict, n: float) -> tuple[float, float, float]:
    """(error, low, high) the fit predicts at n images: the line's value and its 90% confidence interval."""
    v = np.array([1.0, -math.log(n)])
    mean = fit["log_a"] + v[1] * fit["b"]
    se = math.sqrt(max(0.0, float(v @ np.array(fit["cov"]) @ v)))
    t = T90.get(fit["dof"], 1.645)
    return math.exp(mean), math.exp(mean - t * se), math.exp(mean + t * se)


def floor_errors(err: np.ndarray, n_eval: int) -> np.ndarray:
    """An error of 0 on n_eval images means "below about one in n_eval": half an image, so the log is defined."""
    return np.maximum(np.asarray(err, dtype=float), 0.5 / max(1, n_eval))


def nested_subsets(rows: list, classes: list[str], fractions=FRACTIONS, seed: int = 0) -> dict[float, list]:
    """Stratified subsets of the training rows ([path, label, ...]), each containing the smaller ones: every class
    is shuffled once and the first ceil(f * count) (at least 1) taken, so a larger fraction only adds images."""
    by_class = defaultdict(list)
    for r in rows:
        by_class[r[1]].append(r)
    rng = random.Random(seed)
    for c in sorted(by_class):
        rng.shuffle(by_class[c])
    return {f: [r for c in classes for r in by_class[c][:max(1, math.ceil(f * len(by_class[c])))]]
            for f in fractions}


def advice(klass: str, n_now: int, err_now: float, fit: dict | None, n_eval: int) -> str:
    if fit is None:
        return f"{klass}: no errors at any size on {n_eval} images; more images are not what this class needs"
    if fit["b"] - fit["se_b"] <= 0:
        return (f"{klass}: its error does not clearly fall with more of its images at these sizes (exponent "
                f"{fit['b']:.2f} ± {fit['se_b']:.2f}); look at its labels or the recipe before collecting more")
    mid, lo, hi = power_law_at(fit, 2 * n_now)
    return (f"about {n_now} more images of {klass} (twice today's {n_now}) would bring its error from "
            f"{err_now:.1%} to about {mid:.1%} (90% interval {lo:.1%}-{hi:.1%})")


def as_learning_curve(cfg: TrainConfig, of_run: str, fractions=FRACTIONS, epochs: int | None = None) -> TrainConfig:
    """The config of a learning-curve job of run `of_run`: its recipe, optionally with fewer epochs (a budget)."""
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ValueError("fractions must be in (0, 1]")
    d = cfg.to_dict()
    if epochs is not None:
        d["epochs"] = int(epochs)
    return TrainConfig.from_dict({**d, "extra": {**cfg.extra, "kind": LEARNING_CURVE, "of": of_run,
                                                 "fractions": sorted(fractions)}}).validate()


def learning_curve(ws: Workspace, run: Run, reporter) -> dict:
    """Train the recipe on each fraction (sub-runs in the run's folder), fit the power laws, write
    learning_curve.json. Returns {"status"}."""
    cfg = run.config()
    fractions = cfg.extra.get("fractions", list(FRACTIONS))
    split = run.split()
    classes = split["classes"]
    held = "test" if split.get("test") else "val"
    subsets = nested_subsets(split["train"], classes, fractions, cfg.split_seed)
    points = []
    for i, f in enumerate(fractions):
        child = Run(f"{run.id}-{round(f * 100)}pct", run.dir / f"n{round(f * 100)}pct")
        child.dir.mkdir(parents=True, exist_ok=True)
        rows = subsets[f]
        child.write_config(TrainConfig.from_dict({**cfg.to_dict(), "batch_size": min(cfg.batch_size, len(rows))}))
        child.split_path.write_text(json.dumps({**split, "train": rows, "test": split[held]}))
        result = fit(ws, child, SubReporter(reporter, f"{f:.0%} of the images", i, cfg.epochs, {"fraction": f}))
        if result["status"] != "done":
            return {"status": "stopped"}
        preds = read_predictions(child)
        counts = {c: sum(1 for r in rows if r[1] == c) for c in classes}
        per_class = {}
        for c in classes:
            mine = [p for p in preds if p["true"] == c]
            per_class[c] = {"n_train": counts[c], "n_eval": len(mine),
                            "error": (1 - sum(p["correct"] for p in mine) / len(mine)) if mine else None}
        acc = sum(p["correct"] for p in preds) / len(preds) if preds else None
        points.append({"fraction": f, "n_train": len(rows), "accuracy": acc, "per_class": per_class})
        reporter.log(f"{f:.0%} of the training images ({len(rows)}): {held} accuracy {acc:.4f}")
    result = summarize(points, classes, held)
    write_json_atomic(run.dir / "learning_curve.json", result, indent=1)
    for line in result["advice"]:
        reporter.log(line)
    record(ws, run.id, best_val_acc=points[-1]["accuracy"])
    return {"status": "done"}


def summarize(points: list[dict], classes: list[str], held: str = "test") -> dict:
    """Per class: the measured (images, error) points, the power-law fit and the advice line."""
    fits, advice_lines = {}, []
    for c in classes:
        n = np.array([p["per_class"][c]["n_train"] for p in points], dtype=float)
        errs = [p["per_class"][c]["error"] for p in points]
        n_eval = points[-1]["per_class"][c]["n_eval"]
        if n_eval == 0 or any(e is None for e in errs) or len(set(n)) < 2:
            fits[c] = None
            advice_lines.append(f"{c}: too few images in the {held} part to measure")
            continue
        err = np.array(errs, dtype=float)
        fit = None if not err.any() else fit_power_law(n, floor_errors(err, n_eval))
        fits[c] = fit
        advice_lines.append(advice(c, int(n[-1]), float(err[-1]), fit, n_eval))
    return {"held_out": held, "points": points, "fits": fits, "advice": advice_lines}


def read_learning_curve(run: Run) -> dict | None:
    path = run.dir / "learning_curve.json"
    return json.loads(path.read_text()) if path.exists() else None


def latest_for(ws: Workspace, run_id: str) -> Run | None:
    """The newest finished learning-curve job of a run."""
    for row in ws.list_runs():  # newest first
        r = ws.run(row["id"])
        try:
            cfg = r.config()
        except (OSError, ValueError):
            continue
        if cfg.kind == LEARNING_CURVE and cfg.extra.get("of") == run_id and read_learning_curve(r):
            return r
    return None
