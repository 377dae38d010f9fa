"""The decision rule's arithmetic on hand-made probabilities: thresholds, bands, verdicts, intervals."""
from __future__ import annotations

import numpy as np
import pytest

from core.decide.rule import (
    DecisionError,
    Rule,
    best_threshold,
    choose_band,
    choose_binary_band,
    cost_matrix,
    fit_rule,
    report,
    wilson_interval,
)


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_threshold_minimizes_the_given_cost():
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
    pos = np.array([0, 0, 1, 0, 1, 1], dtype=bool)
    # a miss costs 10: the cut must keep the 0.3 positive, paying one false alarm (the 0.6 negative)
    assert best_threshold(p, pos, 10, 1) == pytest.approx(0.25)
    # a false alarm costs 10: the cut goes above the 0.6 negative, missing the 0.3 positive
    assert best_threshold(p, pos, 1, 10) == pytest.approx(0.65)


def cut_cost(t, p, pos, miss, fa):
    return miss * (pos & (p < t)).sum() + fa * (~pos & (p >= t)).sum()


def test_threshold_is_the_cheapest_of_all_cuts_on_random_scores():
    rng = np.random.default_rng(0)
    for trial in range(20):
        p = rng.random(60).round(2)  # ties included
        pos = rng.random(60) < p
        miss, fa = rng.uniform(0.1, 10, 2)
        t = best_threshold(p, pos, miss, fa)
        brute = min(cut_cost(c, p, pos, miss, fa) for c in np.concatenate([[0.0, 1.01], p]))
        assert cut_cost(t, p, pos, miss, fa) == pytest.approx(brute), trial


def test_wilson_interval_by_hand():
    # 95 of 100: centre (0.95 + 1.96^2/200) / (1 + 1.96^2/100), half-width 1.96 sqrt(.0475/100 + 1.96^2/40000) / same
    lo, hi = wilson_interval(95, 100)
    assert (lo, hi) == pytest.approx((0.8882, 0.9785), abs=1e-4)
    assert wilson_interval(40, 40)[1] == 1.0 and wilson_interval(40, 40)[0] == pytest.approx(0.9124, abs=1e-4)
    assert wilson_interval(0, 0) is None
    # the fewer the images, the wider: a band chosen on 40 images says less than one chosen on 400
    assert wilson_interval(38, 40)[0] < wilson_interval(380, 400)[0]


def test_band_reaches_the_target_accuracy_with_the_most_images_automatic():
    margin = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    correct = np.array([1, 1, 1, 1, 1, 0, 1, 1, 0, 0], dtype=bool)
    # the 8 largest margins are 7/8 = 87.5% right, the 9 largest 77.8%; the 5 largest 100%
    assert choose_band(margin, correct, target_accuracy=0.85) == pytest.approx(0.15)
    assert choose_band(margin, correct, target_accuracy=1.0) == pytest.approx(0.45)
    assert choose_band(margin, ~np.ones(10, dtype=bool), target_accuracy=0.5) is None  # never reached
    # a budget of 30% review: the best accuracy among keeping >= 7 images is 7 of the top... keep 8: 87.5%
    assert choose_band(margin, correct, review_budget=0.3) == pytest.approx(0.15)
    assert choose_band(margin, correct, review_budget=0.0) == 0.0  # nothing reviewed


def test_binary_band_edges_are_chosen_apart_by_hand():
    # threshold 0.1 (a miss costs much more than a false alarm): every image at p >= 0.1 is called positive.
    p = np.array([0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2, 0.3, 0.5, 0.7, 0.9, 0.95])
    pos = np.array([0, 0, 0, 0, 1, 0, 0, 1, 0, 1, 1, 1], dtype=bool)
    # 95%: all 4 lowest are right negatives, 0.7 and up right positives; 0.08..0.5 hold 2 errors of 3 wrong calls.
    # The most automatic interval at 100% keeps 4 + 3 = 7: review [0.065, 0.6)
    assert choose_binary_band(p, pos, 0.1, target_accuracy=0.95) == pytest.approx((0.065, 0.6))
    # a band symmetric in logit around 0.1 that leaves 0.05 automatic must also leave 0.2 (|logit| 0.75 vs 0.81):
    # a wrong call; the two-sided band avoids it
    rule = Rule(classes=["ok", "bad"], cost=[[0, 1], [10, 0]], positive="bad", threshold=0.1,
                       band_low=0.065, band_high=0.6)
    probs = np.stack([1 - p, p], 1)
    decided, _, review = rule.decide(probs)
    np.testing.assert_array_equal(review, (p >= 0.065) & (p < 0.6))
    assert (decided[~review] == pos[~review]).all()
    # a review budget of 2 images: the most accurate automatic part reviewing at most 2
    lo, hi = choose_binary_band(p, pos, 0.1, review_budget=2 / 12)
    assert ((p >= lo) & (p < hi)).sum() <= 2
    # nothing to review when the threshold already decides every validation image right
    assert choose_binary_band(p, p >= 0.6, 0.6, target_accuracy=1.0) == (0.6, 0.6)
    assert choose_binary_band(p, pos, 0.1, target_accuracy=1.01) is None


def test_binary_band_is_the_brute_force_optimum():
    rng = np.random.default_rng(3)
    for trial in range(30):
        n = int(rng.integers(5, 40))
        p = np.round(rng.random(n), 2)  # ties on purpose
        pos = rng.random(n) < p
        t = float(rng.choice([0.1, 0.3, 0.5, 0.8]))
        cuts = np.unique(np.concatenate([[0.0, 1.0, t], (np.sort(p)[:-1] + np.sort(p)[1:]) / 2]))
        best_t, best_b = None, None
        budget = 0.25
        for lo in cuts[cuts <= t]:
            for hi in cuts[cuts >= t]:
                review = (p >= lo) & ((p < hi) | (hi >= 1.0)) if lo < hi else np.zeros(n, bool)
                auto = ~review
                if not auto.any():
                    continue
                acc = ((p[auto] >= t) == pos[auto]).mean()
                k = auto.sum()
                if acc >= 0.9 - 1e-12 and (best_t is None or (k, acc) > best_t):
                    best_t = (k, acc)
                if review.sum() <= budget * n + 1e-9 and (best_b is None or (acc, k) > best_b):
                    best_b = (acc, k)
        for target, budget_arg, best in ((0.9, None, best_t), (None, budget, best_b)):
            found = choose_binary_band(p, pos, t, target, budget_arg)
            if best is None:
                assert found is None
                continue
            lo, hi = found
            review = (p >= lo) & ((p < hi) | (hi >= 1.0)) if lo < hi else np.zeros(n, bool)
            auto = ~review
            got = (auto.sum(), ((p[auto] >= t) == pos[auto]).mean())
            assert (got if target else got[::-1]) == pytest.approx(best), (trial, target, found)


def test_rule_verdicts_binary_and_cost_matrix():
    rule = Rule(classes=["good", "bad"], cost=cost_matrix(["good", "bad"], "bad", 10, 1).tolist(),
                       positive="bad", threshold=0.2, band=0.5)
    probs = np.array([[0.95, 0.05], [0.85, 0.15], [0.7, 0.3], [0.1, 0.9]])
    # margins |logit p - logit 0.2|: 1.56, 0.35, 0.54, 3.58
    assert rule.verdicts(probs) == ["pass", "review", "fail", "fail"]
    lo, hi = rule.band_range()
    assert lo < 0.2 < hi and lo == pytest.approx(1 / (1 + np.exp(-(np.log(0.25) - 0.5))))
    three = ["a", "b", "c"]
    cost = [[0, 1, 1], [20, 0, 1], [1, 1, 0]]  # calling a "b" an "a" is 20 times as bad
    rule = Rule(classes=three, cost=cost)
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.1, 0.7]])
    # row 1: expected cost of a = 0.3*20 = 6, of b = 0.6+0.1 = 0.7, of c = 0.9 -> b, though a is likelier
    assert rule.verdicts(probs) == ["b", "c"]


def test_fit_rule_with_several_classes_uses_the_cost_matrix_and_a_confidence_floor():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 300)
    z = rng.normal(0, 1, (300, 3))
    z[np.arange(300), y] += 2.0
    probs = _softmax(2 * z)  # the true posterior of this generator: calibrated
    rule = fit_rule(probs, y, ["a", "b", "c"], cost=[[0, 1, 1], [5, 0, 1], [1, 1, 0]], target_accuracy=0.95)
    assert rule.threshold is None and rule.band is not None
    decided, margin, review = rule.decide(probs)
    np.testing.assert_array_equal(decided, (probs @ np.array(rule.cost)).argmin(1))
    assert (decided[~review] == y[~review]).mean() >= 0.95  # reached on the images it was chosen on
    assert np.all(margin[review] < rule.band) and np.all(margin[~review] >= rule.band)
    rep = report(rule, probs, y)
    assert rep["rule"]["cost"] <= rep["argmax"]["cost"]  # Bayes decisions on these (calibrated) scores cost less
    assert rep["coverage"] == pytest.approx((~review).mean())


def test_fit_rule_rejects_what_it_cannot_use():
    probs, y = np.array([[0.6, 0.4]] * 12), np.zeros(12, dtype=int)
    with pytest.raises(DecisionError, match="not one of"):
        fit_rule(probs, y, ["a", "b"], positive="c")
    with pytest.raises(DecisionError, match=">= 0"):
        fit_rule(probs, y, ["a", "b"], positive="b", cost_miss=-1)
    with pytest.raises(DecisionError, match="2 x 2"):
        fit_rule(probs, y, ["a", "b"], cost=[[0, 1, 1]])
