"""A decision rule: the class each image gets under a cost matrix (binary: a threshold on p(positive)), a
"send to a person" band, and the rule's report on a part."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from core.errors import UserError


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
