"""The release gate: is a candidate model worse than the current release on the golden set? Numbers only (paired
decisions on the same images, with the same labels); core/deploy/release.py feeds it and keeps its verdict.

It refuses when any of these holds:
- McNemar's exact test on the paired decisions says the candidate is significantly worse (one-sided: among the
  images exactly one model decides right, the candidate is the wrong one more often than chance allows at `alpha`);
- any class's recall drops by more than `recall_tolerance` (the golden set's per-class view: a model can keep its
  accuracy by trading a rare class away);
- the decision rule's mean cost per image rises (both models' decisions priced with the same cost matrix).
"""
from __future__ import annotations

from dataclasses import dataclass
from math import comb

import numpy as np

from core.decide.rule import Rule

DEFAULT_RECALL_TOLERANCE = 0.02  # 2 points
DEFAULT_ALPHA = 0.05


def mcnemar_exact(worse: int, better: int) -> float:
    """One-sided exact McNemar p-value that the candidate is worse: P(X >= worse) for X ~ Binomial(worse + better,
    1/2), where `worse` counts images only the current model decides right and `better` images only the candidate
    does. 1.0 when they never disagree."""
    n = worse + better
    if n == 0:
        return 1.0
    return min(1.0, sum(comb(n, k) for k in range(worse, n + 1)) / 2 ** n)


@dataclass
class Side:
    """One model on the golden set: calibrated probabilities in the golden set's row order, and its rule (or None:
    argmax)."""
    probs: np.ndarray
    rule: Rule | None

    def decided(self) -> np.ndarray:
        if self.rule is not None:
            return self.rule.decide(self.probs)[0]
        return self.probs.argmax(1) if len(self.probs) else np.zeros(0, dtype=np.int64)


def compare(classes: list[str], y: np.ndarray, current: Side, candidate: Side,
            recall_tolerance: float = DEFAULT_RECALL_TOLERANCE, alpha: float = DEFAULT_ALPHA) -> dict:
    """The gate's report: accuracies, the disagreements and McNemar's p, per-class recall, cost, and whether it
    refuses (with its reasons, one line each). `regressions` / `fixes`: row indices the current model gets right and
    the candidate wrong, and the reverse."""
    y = np.asarray(y, dtype=np.int64)
    k = len(classes)
    d_cur, d_cand = current.decided(), candidate.decided()
    right_cur, right_cand = d_cur == y, d_cand == y
    regressions = np.flatnonzero(right_cur & ~right_cand)
    fixes = np.flatnonzero(~right_cur & right_cand)
    p = mcnemar_exact(len(regressions), len(fixes))
    per_class, drops = [], []
    for i, c in enumerate(classes):
        mask = y == i
        if not mask.any():
            continue
        r_cur, r_cand = float(right_cur[mask].mean()), float(right_cand[mask].mean())
        per_class.append({"class": c, "support": int(mask.sum()), "current_recall": r_cur, "candidate_recall": r_cand,
                          "change": r_cand - r_cur})
        if r_cur - r_cand > recall_tolerance + 1e-12:
            drops.append(per_class[-1])
    rule = candidate.rule or current.rule  # one price list for both: the candidate's rule's costs, else the current's
    cost = np.asarray(rule.cost) if rule is not None else np.ones((k, k)) - np.eye(k)
    n = len(y)
    cost_cur = float(cost[y, d_cur].mean()) if n else 0.0
    cost_cand = float(cost[y, d_cand].mean()) if n else 0.0
    reasons = []
    if len(regressions) > len(fixes) and p < alpha:
        reasons.append(f"significantly worse: {len(regressions)} golden images only the current release decides "
                       f"right, {len(fixes)} only the candidate does (McNemar exact p = {p:.4f} < {alpha:g})")
    for d in drops:
        reasons.append(f"recall of {d['class']} drops {-d['change'] * 100:.1f} points ({d['current_recall']:.3f} -> "
                       f"{d['candidate_recall']:.3f}, {d['support']} golden images; tolerance "
                       f"{recall_tolerance * 100:g} points)")
    if cost_cand > cost_cur + 1e-12:
        reasons.append(f"the decision rule's cost rises: {cost_cand:.4f} per golden image against {cost_cur:.4f}")
    return {"n": int(n), "current_accuracy": float(right_cur.mean()) if n else None,
            "candidate_accuracy": float(right_cand.mean()) if n else None,
            "regressions": regressions.tolist(), "fixes": fixes.tolist(), "mcnemar_p": p, "alpha": alpha,
            "per_class": per_class, "recall_tolerance": recall_tolerance,
            "cost": {"current": cost_cur, "candidate": cost_cand, "priced_with": "candidate's rule" if candidate.rule
                     else "current release's rule" if current.rule else "0/1 (no rule)"},
            "refuse": bool(reasons), "reasons": reasons}
