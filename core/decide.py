"""Deciding with a model: calibrated probabilities, a cost-based rule, and a "send to a person" band.

Everything here is arithmetic on probability rows (numpy only, no torch: the ONNX predictor uses it too):
- calibration: one temperature T fitted on the validation part by minimizing the negative log-likelihood
  (Guo et al. 2017). It is applied to the probabilities the one inference path gives, softmax(log p / T), which is
  the logits divided by T for a plain forward pass and stays defined for the flip-averaged (TTA) probabilities.
- a Rule: which class each image gets (binary: p(positive) >= threshold, the threshold that minimizes the cost of
  misses and false alarms on validation; several classes: the class of least expected cost under a cost matrix),
  and a review band: images whose decision margin is below `band` go to a person.
- reports of a rule on a part (test): cost against the argmax rule, confusion matrix, precision/recall, coverage
  and accuracy of the automatic decisions.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import UserError
from .storage import write_json_atomic

EPS = 1e-12
ECE_BINS = 15  # equal-width confidence bins, as in Guo et al.
MIN_VAL_FOR_CALIBRATION = 10  # fewer validation images than this: T stays 1 (a fit on a handful is noise)


# --- calibration ---------------------------------------------------------------------------------------------

def calibrate(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T) of each row: T > 1 softens over-confident probabilities, T < 1 sharpens. Argmax is kept."""
    probs = np.asarray(probs, dtype=np.float64)
    if temperature == 1.0 or probs.size == 0:
        return probs
    z = np.log(np.clip(probs, EPS, 1.0)) / temperature
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes."""
    y = np.asarray(y, dtype=np.int64)
    return float(-np.log(np.clip(probs[np.arange(len(y)), y], EPS, 1.0)).mean()) if len(y) else float("nan")


def fit_temperature(probs: np.ndarray, y: np.ndarray, low: float = 0.05, high: float = 20.0) -> float:
    """The T in [low, high] minimizing the validation NLL of calibrate(probs, T) (Guo et al. 2017). The NLL is
    convex in 1/T, so a golden-section search over log T finds its minimum. 1.0 when there are too few images.

    When the model gets every validation image right, the NLL falls without end as T -> 0: nothing shows the model
    over-confident, and nothing bounds how certain it should become. Then T never softens and sharpens only as
    far as Platt's (1999) targets allow, 1 - 1/(n+2) on the true class: n right answers in a row justify about that
    much confidence, not certainty."""
    y = np.asarray(y, dtype=np.int64)
    n, k = len(y), (probs.shape[1] if np.ndim(probs) == 2 else 0)
    if n < MIN_VAL_FOR_CALIBRATION or k < 2:
        return 1.0
    separable = bool(np.all(probs.argmax(1) == y))
    target = np.zeros((n, k))
    target[np.arange(n), y] = 1.0
    if separable:
        eps = 1.0 / (n + 2)
        target = target * (1.0 - eps) + (1.0 - target) * eps / (k - 1)

    def f(log_t):
        return float(-(target * np.log(np.clip(calibrate(probs, math.exp(log_t)), EPS, 1.0))).sum(1).mean())

    a, b = math.log(low), math.log(high)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(60):  # the bracket shrinks by 0.618 each step: 60 steps reach ~1e-12 of log T
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    t = math.exp((a + b) / 2)
    if separable:
        t = min(t, 1.0)
    return t if f(math.log(t)) < f(0.0) else 1.0  # never worse than leaving the model alone


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> dict:
    """The reliability diagram's data (per equal-width confidence bin: count, mean confidence, accuracy) and the
    expected calibration error: the count-weighted mean |accuracy - confidence| over the bins."""
    y = np.asarray(y, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(1) if len(y) else np.zeros(0)
    correct = (probs.argmax(1) == y) if len(y) else np.zeros(0, dtype=bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        m = which == b
        n = int(m.sum())
        row = {"low": float(edges[b]), "high": float(edges[b + 1]), "n": n,
               "confidence": float(conf[m].mean()) if n else None, "accuracy": float(correct[m].mean()) if n else None}
        if n:
            ece += n / len(y) * abs(row["accuracy"] - row["confidence"])
        rows.append(row)
    return {"bins": rows, "ece": float(ece) if len(y) else float("nan")}


def ece(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    return reliability(probs, y, bins)["ece"]


# --- costs and the rule ----------------------------------------------------------------------------------------

def cost_matrix(classes: list[str], positive: str | None = None, cost_miss: float = 1.0,
                cost_false_alarm: float = 1.0, ordinal: bool = False) -> np.ndarray:
    """cost[true][decided]: 0 on the diagonal, 1 elsewhere; with a positive class, a missed positive costs
    `cost_miss` and a negative called positive `cost_false_alarm`. For ordered grades (`ordinal`, several classes):
    the grades apart, so that the least expected cost decides the median grade of the probabilities."""
    k = len(classes)
    if ordinal and positive is None:
        grade = np.arange(k, dtype=np.float64)
        return np.abs(grade[:, None] - grade[None, :])
    c = np.ones((k, k)) - np.eye(k)
    if positive is not None:
        ip = classes.index(positive)
        c[ip, :] = cost_miss
        c[:, ip] = cost_false_alarm
        c[ip, ip] = 0.0
    return c


def total_cost(y: np.ndarray, decided: np.ndarray, cost: np.ndarray) -> float:
    return float(np.asarray(cost)[np.asarray(y, dtype=np.int64), np.asarray(decided, dtype=np.int64)].sum())


def best_threshold(p_pos: np.ndarray, is_pos: np.ndarray, cost_miss: float, cost_false_alarm: float) -> float:
    """The threshold t (positive when p >= t) with the least total cost on these images. Every cut between two
    distinct probabilities is tried; among equally cheap cuts, the one nearest the Bayes threshold
    cost_false_alarm / (cost_miss + cost_false_alarm), which calibrated probabilities would make optimal."""
    p = np.asarray(p_pos, dtype=np.float64)
    is_pos = np.asarray(is_pos, dtype=bool)
    bayes = cost_false_alarm / (cost_miss + cost_false_alarm)
    if len(p) == 0:
        return bayes
    u = np.unique(p)
    # cut k: images with p >= u[k] are positive (k = len(u): none is)
    cuts = np.concatenate([[0.0], (u[:-1] + u[1:]) / 2, [(u[-1] + 1.0) / 2 if u[-1] < 1.0 else np.nextafter(1.0, 2)]])
    order = np.searchsorted(u, p)  # index of each image's value in u
    pos_at = np.bincount(order[is_pos], minlength=len(u))
    neg_at = np.bincount(order[~is_pos], minlength=len(u))
    misses = np.concatenate([[0], np.cumsum(pos_at)])          # positives below cut k
    false_alarms = neg_at.sum() - np.concatenate([[0], np.cumsum(neg_at)])  # negatives at or above cut k
    cost = cost_miss * misses + cost_false_alarm * false_alarms
    best = np.flatnonzero(cost == cost.min())
    return float(cuts[best[np.argmin(np.abs(cuts[best] - bayes))]])


def _logit(p):
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


@dataclass
class Rule:
    """How a model's calibrated probabilities become decisions. Binary with `positive`: positive when
    p(positive) >= threshold; otherwise the class of least expected cost under `cost` (cost[true][decided]).
    Review band (images sent to a person): binary, p(positive) in [band_low, band_high), its two edges chosen apart
    (a lopsided cost puts the threshold near 0 or 1, where a band symmetric around it cannot reach a target);
    rules saved before that have `band`, a margin |logit p - logit threshold| below which an image is reviewed.
    Several classes: `band`, the decided class's probability below which an image is reviewed. None: no band."""
    classes: list[str]
    cost: list[list[float]]
    positive: str | None = None
    threshold: float | None = None
    band: float | None = None
    target_accuracy: float | None = None   # what the band was chosen for (one of the two, or neither)
    review_budget: float | None = None
    inputs: dict = field(default_factory=dict)  # the user's costs, as given
    band_low: float | None = None   # binary: the review interval of p(positive), [band_low, band_high)
    band_high: float | None = None

    @property
    def has_band(self) -> bool:
        return self.band is not None or self.band_low is not None

    @property
    def binary(self) -> bool:
        return self.positive is not None and len(self.classes) == 2

    def decide(self, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(decided class index, margin, review flag) per row of calibrated probabilities."""
        probs = np.asarray(probs, dtype=np.float64)
        if self.binary:
            ip = self.classes.index(self.positive)
            p = probs[:, ip]
            decided = np.where(p >= self.threshold, ip, 1 - ip)
            margin = np.abs(_logit(p) - _logit(self.threshold))
        else:
            decided = (probs @ np.asarray(self.cost)).argmin(1) if len(probs) else np.zeros(0, dtype=np.int64)
            margin = probs[np.arange(len(probs)), decided]
        if self.binary and self.band_low is not None:
            review = (p >= self.band_low) & ((p < self.band_high) | (self.band_high >= 1.0))
            if self.band_low == self.band_high:
                review[:] = False  # an empty band: every image decided automatically
        elif self.band is not None:
            review = margin < self.band
        else:
            review = np.zeros(len(probs), dtype=bool)
        return decided, margin, review

    def decisions(self, probs: np.ndarray) -> list[dict]:
        """Per row: {"verdict": "review", or for a binary rule "fail" (the positive class) / "pass", else the class
        name; "class": the rule's class; "review": bool; "margin"}."""
        decided, margin, review = self.decide(probs)
        out = []
        for d, m, r in zip(decided, margin, review):
            label = self.classes[int(d)]
            verdict = "review" if r else ("fail" if label == self.positive else "pass") if self.binary else label
            out.append({"verdict": verdict, "class": label, "review": bool(r), "margin": float(m)})
        return out

    def verdicts(self, probs: np.ndarray) -> list[str]:
        return [d["verdict"] for d in self.decisions(probs)]

    def band_range(self) -> tuple[float, float] | None:
        """Binary: the p(positive) interval sent to a person."""
        if not self.binary or not self.has_band:
            return None
        if self.band_low is not None:
            return float(self.band_low), float(self.band_high)
        lo, hi = _logit(self.threshold) - self.band, _logit(self.threshold) + self.band
        return float(1 / (1 + math.exp(-lo))), float(1 / (1 + math.exp(-hi)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Rule":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def choose_band(margin: np.ndarray, correct: np.ndarray, target_accuracy: float | None = None,
                review_budget: float | None = None) -> float | None:
    """The margin below which images go to a person. With a target accuracy: the band that keeps the most images
    automatic while their accuracy reaches the target; with a review budget (a fraction): the most accurate
    automatic part that sends at most that fraction to a person. None when the target cannot be reached."""
    margin = np.asarray(margin, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    n = len(margin)
    if n == 0 or (target_accuracy is None and review_budget is None):
        return None
    order = np.argsort(-margin, kind="stable")
    s, c = margin[order], correct[order]
    acc = np.cumsum(c) / np.arange(1, n + 1)   # accuracy of the k most confident, k = 1..n
    # a band can only cut between two distinct margins (k = n: nothing reviewed)
    cut_ok = np.concatenate([s[:-1] > s[1:], [True]])
    ks = np.arange(1, n + 1)
    if target_accuracy is not None:
        ok = cut_ok & (acc >= target_accuracy - 1e-12)
        if not ok.any():
            return None
        k = int(ks[ok].max())
    else:
        ok = cut_ok & (ks >= math.ceil(n * (1 - review_budget) - 1e-9))
        if not ok.any():
            return None
        best = acc[ok].max()
        k = int(ks[ok & (acc >= best - 1e-12)].max())
    return 0.0 if k == n else float((s[k - 1] + s[k]) / 2)


def choose_binary_band(p: np.ndarray, positive: np.ndarray, threshold: float, target_accuracy: float | None = None,
                       review_budget: float | None = None) -> tuple[float, float] | None:
    """The review interval [low, high) of p(positive) around the threshold, its edges chosen apart. With a target
    accuracy: the interval that keeps the most images automatic (ties: the more accurate) while their accuracy
    reaches the target; with a review budget: the most accurate automatic part reviewing at most that fraction
    (ties: the fewer reviewed). Below `low` the rule says negative, from `high` up positive. (threshold, threshold):
    no band needed. None when the target cannot be reached."""
    p = np.asarray(p, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    n = len(p)
    if n == 0 or (target_accuracy is None and review_budget is None):
        return None
    order = np.argsort(p, kind="stable")
    s, y = p[order], pos[order]
    m = int(np.searchsorted(s, threshold, side="left"))   # images below the threshold: decided negative
    neg_ok = np.concatenate([[0], np.cumsum(~y)])          # correct negatives among the i lowest
    pos_ok = np.concatenate([np.cumsum(y[::-1])[::-1], [0]])  # correct positives among those from j up
    # edges only between two distinct values, or at the threshold itself
    lows = np.array([i for i in range(m + 1) if i in (0, m) or s[i - 1] < s[i]])
    highs = np.array([j for j in range(m, n + 1) if j in (m, n) or s[j - 1] < s[j]])
    auto = lows[:, None] + (n - highs[None, :])
    hits = neg_ok[lows][:, None] + pos_ok[highs][None, :]
    acc = np.divide(hits, auto, out=np.zeros(auto.shape), where=auto > 0)
    if target_accuracy is not None:  # the most automatic, then the most accurate
        ok = (acc >= target_accuracy - 1e-12) & (auto > 0)
        first, second = auto, acc
    else:                            # the most accurate, then the most automatic
        ok = (n - auto) <= review_budget * n + 1e-9
        first, second = acc, auto
    if not ok.any():
        return None
    ok &= first >= first[ok].max() - 1e-12
    ok &= second >= second[ok].max() - 1e-12
    a, b = (int(v[0]) for v in np.nonzero(ok))
    i, j = int(lows[a]), int(highs[b])
    low = threshold if i == m else (0.0 if i == 0 else float((s[i - 1] + s[i]) / 2))
    high = threshold if j == m else (1.0 if j == n else float((s[j - 1] + s[j]) / 2))
    return float(low), float(high)


class DecisionError(UserError, ValueError):
    """A decision cannot be made as asked (unknown class, negative cost, run not evaluated); the message says why."""


def fit_rule(val_probs: np.ndarray, val_y: np.ndarray, classes: list[str], positive: str | None = None,
             cost_miss: float = 1.0, cost_false_alarm: float = 1.0, cost: list[list[float]] | None = None,
             target_accuracy: float | None = None, review_budget: float | None = None) -> Rule:
    """A rule chosen on the validation part's calibrated probabilities."""
    if positive is not None and positive not in classes:
        raise DecisionError(f"positive class {positive!r} is not one of {', '.join(classes)}")
    for name, v in (("cost_miss", cost_miss), ("cost_false_alarm", cost_false_alarm)):
        if not (v >= 0 and math.isfinite(v)):
            raise DecisionError(f"{name} must be a number >= 0")
    if cost_miss + cost_false_alarm <= 0:
        raise DecisionError("the cost of a miss and of a false alarm cannot both be 0")
    if target_accuracy is not None and not 0 < target_accuracy <= 1:
        raise DecisionError("target accuracy must be in (0, 1]")
    if review_budget is not None and not 0 <= review_budget < 1:
        raise DecisionError("review budget must be a fraction in [0, 1)")
    val_y = np.asarray(val_y, dtype=np.int64)
    if cost is None:
        cost = cost_matrix(classes, positive, cost_miss, cost_false_alarm).tolist()
    elif np.asarray(cost).shape != (len(classes), len(classes)) or np.any(np.asarray(cost) < 0):
        raise DecisionError(f"the cost matrix must be {len(classes)} x {len(classes)} with costs >= 0")
    rule = Rule(classes=list(classes), cost=[[float(v) for v in row] for row in cost],
                positive=positive if len(classes) == 2 else None, target_accuracy=target_accuracy,
                review_budget=review_budget,
                inputs={"positive": positive, "cost_miss": cost_miss, "cost_false_alarm": cost_false_alarm,
                        "cost": cost, "target_accuracy": target_accuracy, "review_budget": review_budget})
    if rule.binary:
        ip = classes.index(positive)
        rule.threshold = best_threshold(val_probs[:, ip], val_y == ip, cost_miss, cost_false_alarm)
        found = choose_binary_band(val_probs[:, ip], val_y == ip, rule.threshold, target_accuracy, review_budget)
        rule.band_low, rule.band_high = found if found else (None, None)
        return rule
    decided, margin, _ = rule.decide(val_probs)
    rule.band = choose_band(margin, decided == val_y, target_accuracy, review_budget)
    return rule


def _rates(y, decided, k):
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y, decided), 1)
    tp = np.diag(cm).astype(float)
    precision = np.divide(tp, cm.sum(0), out=np.zeros(k), where=cm.sum(0) > 0)
    recall = np.divide(tp, cm.sum(1), out=np.zeros(k), where=cm.sum(1) > 0)
    return cm, precision, recall


def report(rule: Rule, probs: np.ndarray, y: np.ndarray) -> dict:
    """The rule on a part against the argmax rule: cost, accuracy, confusion matrix, precision/recall (of the
    positive class when there is one, else macro), and the band's coverage and accuracy."""
    y = np.asarray(y, dtype=np.int64)
    k = len(rule.classes)
    decided, margin, review = rule.decide(probs)
    argmax = probs.argmax(1) if len(probs) else np.zeros(0, dtype=np.int64)
    out = {"n": int(len(y)), "threshold": rule.threshold, "band": rule.band, "band_range": rule.band_range()}
    for name, d in (("rule", decided), ("argmax", argmax)):
        cm, precision, recall = _rates(y, d, k)
        ip = rule.classes.index(rule.positive) if rule.binary else None
        out[name] = {"cost": total_cost(y, d, rule.cost), "accuracy": float((d == y).mean()) if len(y) else None,
                     "confusion_matrix": cm.tolist(),
                     "precision": float(precision[ip] if ip is not None else precision.mean()),
                     "recall": float(recall[ip] if ip is not None else recall.mean())}
    auto = ~review
    out["coverage"] = float(auto.mean()) if len(y) else None
    out["band_accuracy"] = float((decided[auto] == y[auto]).mean()) if auto.any() else None
    out["reviewed"] = int(review.sum())
    return out


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """The Wilson score interval (95% with z=1.96) of an accuracy measured as hits of n: how far the same rule's
    accuracy on other images of the same kind may lie. None for n = 0."""
    if n <= 0:
        return None
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def coverage_curve(margin: np.ndarray, correct: np.ndarray, points: int = 200) -> list[dict]:
    """Accuracy of the automatic decisions against the share kept automatic, as the band widens: the k images of
    largest margin for k = n down to 1 (at most `points` of them)."""
    margin = np.asarray(margin, dtype=np.float64)
    n = len(margin)
    if n == 0:
        return []
    order = np.argsort(-margin, kind="stable")
    acc = np.cumsum(np.asarray(correct, dtype=bool)[order]) / np.arange(1, n + 1)
    ks = np.unique(np.linspace(1, n, min(points, n)).round().astype(int))
    return [{"coverage": float(k / n), "accuracy": float(acc[k - 1])} for k in ks]


# --- stored with the run: the raw scores, the temperature, the rule ----------------------------------------------

@dataclass
class Scores:
    """A run's uncalibrated probabilities on its validation part and on the part it is evaluated on."""
    classes: list[str]
    val_probs: np.ndarray
    val_y: np.ndarray
    test_probs: np.ndarray
    test_y: np.ndarray
    test_part: str = "test"


def calibrate_run(run, scores: Scores) -> dict:
    """Fit the run's temperature on validation, keep the raw scores for later decisions, and return (and store)
    the calibration: T, and NLL / ECE / reliability bins on the evaluated part before and after."""
    t = fit_temperature(scores.val_probs, scores.val_y)
    before, after = scores.test_probs, calibrate(scores.test_probs, t)
    rel_before, rel_after = reliability(before, scores.test_y), reliability(after, scores.test_y)
    n_val = len(scores.val_y)
    note = (f"fewer than {MIN_VAL_FOR_CALIBRATION} validation images: not calibrated"
            if n_val < MIN_VAL_FOR_CALIBRATION else None)
    cal = {"temperature": t, "fitted_on": "val", "n_val": int(n_val), "note": note, "evaluated_on": scores.test_part,
           "n": int(len(scores.test_y)),
           "nll_before": nll(before, scores.test_y), "nll_after": nll(after, scores.test_y),
           "ece_before": rel_before["ece"], "ece_after": rel_after["ece"],
           "val_nll_before": nll(scores.val_probs, scores.val_y),
           "val_nll_after": nll(calibrate(scores.val_probs, t), scores.val_y),
           "reliability_before": rel_before["bins"], "reliability_after": rel_after["bins"]}
    tmp = run.scores_path.with_suffix(".tmp.npz")
    np.savez(tmp, classes=np.array(scores.classes), val_probs=scores.val_probs, val_y=scores.val_y,
             test_probs=scores.test_probs, test_y=scores.test_y, test_part=np.array(scores.test_part))
    os.replace(tmp, run.scores_path)
    write_json_atomic(run.calibration_path, cal)
    return cal


def load_scores(run) -> Scores:
    if not run.scores_path.exists():
        raise DecisionError(f"run {run.id} has no stored scores: evaluate it first (Evaluate page, or "
                            f"`python -m core evaluate {run.id}`)")
    with np.load(run.scores_path) as z:
        return Scores([str(c) for c in z["classes"]], z["val_probs"], z["val_y"], z["test_probs"], z["test_y"],
                      str(z["test_part"]))


def _band_json(rule: Rule):
    if not rule.has_band:
        return None
    if rule.binary:
        lo, hi = rule.band_range()
        return {"p_low": lo, "p_high": hi, "none_needed": lo == hi}
    return {"min_confidence": rule.band, "none_needed": rule.band == 0}


def decide_run(run, positive: str | None = None, cost_miss: float = 1.0, cost_false_alarm: float = 1.0,
               cost: list[list[float]] | None = None, target_accuracy: float | None = None,
               review_budget: float | None = None, save: bool = True) -> dict:
    """Choose a rule on the run's validation part (calibrated), score it on the evaluated part, and save it with the
    run (Predict, the CLI, exports and the predictions CSV then use it). Returns the rule and both reports."""
    sc = load_scores(run)
    t = run.temperature()
    val, test = calibrate(sc.val_probs, t), calibrate(sc.test_probs, t)
    rule = fit_rule(val, sc.val_y, sc.classes, positive, cost_miss, cost_false_alarm, cost, target_accuracy,
                    review_budget)
    on_test, on_val = report(rule, test, sc.test_y), report(rule, val, sc.val_y)
    curves = {}
    for name, probs, y in (("val", val, sc.val_y), ("test", test, sc.test_y)):
        decided, margin, _ = rule.decide(probs)
        curves[name] = coverage_curve(margin, decided == y)
    if save:
        save_rule(run, rule)
    return {"run_id": run.id, "part": sc.test_part, "temperature": t, "threshold": rule.threshold,
            "test_cost": on_test["rule"]["cost"], "test_cost_argmax": on_test["argmax"]["cost"],
            "band": _band_json(rule), "band_reachable": rule.has_band or (target_accuracy is None
                                                                                 and review_budget is None),
            "coverage": on_test["coverage"], "band_accuracy": on_test["band_accuracy"],
            "val_band_interval": _val_interval(on_val),
            "rule": rule.to_dict(), "test": on_test, "val": on_val, "curves": curves}


def _val_interval(on_val: dict) -> list[float] | None:
    """The 95% interval of the accuracy the band was chosen on (the validation images decided automatically):
    a band chosen on a few hundred images can land below its target on test."""
    if on_val["coverage"] is None or on_val["band_accuracy"] is None:
        return None
    decided = on_val["n"] - on_val["reviewed"]
    found = wilson_interval(round(on_val["band_accuracy"] * decided), decided)
    return [round(found[0], 4), round(found[1], 4)] if found else None


def refit_saved_rule(run) -> Rule | None:
    """After a re-evaluation (new weights or temperature), choose the saved rule again from the user's same inputs."""
    old = load_rule(run)
    if old is None:
        return None
    try:
        return Rule.from_dict(decide_run(run, **old.inputs)["rule"])
    except DecisionError:
        clear_rule(run)  # the classes changed under it: a stale rule would decide wrongly
        return None


def save_rule(run, rule: Rule) -> None:
    write_json_atomic(run.rule_path, rule.to_dict())


def load_rule(run) -> Rule | None:
    return Rule.from_dict(json.loads(run.rule_path.read_text())) if run.rule_path.exists() else None


def clear_rule(run) -> None:
    run.rule_path.unlink(missing_ok=True)
