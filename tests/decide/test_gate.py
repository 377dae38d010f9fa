"""The release gate's numbers: McNemar's exact test, per-class recall, the rule's cost."""
import numpy as np
import pytest
from scipy.stats import binomtest

from core.decide.gate import Side, compare, mcnemar_exact
from core.decide.rule import Rule, cost_matrix

CLASSES = ["ok", "defect"]


@pytest.mark.parametrize("worse,better", [(0, 0), (5, 0), (6, 1), (3, 3), (1, 9), (20, 8)])
def test_mcnemar_is_the_exact_binomial_tail(worse, better):
    want = 1.0 if worse + better == 0 else binomtest(worse, worse + better, 0.5, alternative="greater").pvalue
    assert mcnemar_exact(worse, better) == pytest.approx(want)


def _probs(decided):
    p = np.full((len(decided), 2), 0.1)
    p[np.arange(len(decided)), decided] = 0.9
    return p


def test_significantly_worse_is_refused_and_the_regressions_listed():
    y = np.array([0] * 20 + [1] * 20)
    cand = y.copy()
    cand[[0, 1, 2, 3, 20, 21, 22, 23]] = 1 - cand[[0, 1, 2, 3, 20, 21, 22, 23]]
    r = compare(CLASSES, y, Side(_probs(y), None), Side(_probs(cand), None))
    assert r["refuse"] and r["regressions"] == [0, 1, 2, 3, 20, 21, 22, 23] and r["fixes"] == []
    assert r["mcnemar_p"] == pytest.approx(0.5 ** 8)
    assert any("McNemar" in x for x in r["reasons"])


def test_a_class_recall_drop_beyond_the_tolerance_is_refused_even_when_accuracy_holds():
    y = np.array([0] * 50 + [1] * 10)
    cur = y.copy()
    cur[:2] = 1  # the current model misses two ok images
    cand = y.copy()
    cand[50] = 0  # the candidate gets those right and misses one defect: more accurate, defect recall -10 points
    r = compare(CLASSES, y, Side(_probs(cur), None), Side(_probs(cand), None))
    assert r["candidate_accuracy"] > r["current_accuracy"]
    assert r["refuse"] and any("recall of defect drops 10.0 points" in x for x in r["reasons"])
    assert not compare(CLASSES, y, Side(_probs(cur), None), Side(_probs(cand), None), recall_tolerance=0.2)["refuse"]


def test_cost_is_priced_with_the_rule_and_a_rise_is_refused():
    y = np.array([0] * 10 + [1] * 10)
    rule = Rule(CLASSES, cost_matrix(CLASSES, "defect", cost_miss=10).tolist(), positive="defect", threshold=0.5)
    cur, cand = y.copy(), y.copy()
    cur[0] = 1    # a false alarm costs 1
    cand[10] = 0  # a miss costs 10
    r = compare(CLASSES, y, Side(_probs(cur), rule), Side(_probs(cand), rule), recall_tolerance=0.5)
    assert r["cost"] == {"current": 0.05, "candidate": 0.5, "priced_with": "candidate's rule"}
    assert r["refuse"] and r["reasons"] == ["the decision rule's cost rises: 0.5000 per golden image against 0.0500"]


def test_an_equal_or_better_candidate_passes():
    y = np.array([0] * 10 + [1] * 10)
    cur = y.copy()
    cur[[0, 15]] = 1 - cur[[0, 15]]
    r = compare(CLASSES, y, Side(_probs(cur), None), Side(_probs(y), None))
    assert not r["refuse"] and r["fixes"] == [0, 15] and r["reasons"] == []
