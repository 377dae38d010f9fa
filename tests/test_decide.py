"""Deciding with a model (core/decide/): the arithmetic on hand-made probabilities, then one run end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, tiny_config, write_class_folders
from core.decide.calibration import MIN_VAL_FOR_CALIBRATION, calibrate, ece, fit_temperature, nll
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
from core.decide.stored import decide_run, load_rule, load_scores


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


def test_temperature_lowers_the_nll_of_overconfident_logits_and_recovers_the_scale():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 1.5, (4000, 4))
    y = np.array([rng.choice(4, p=row) for row in _softmax(z)])
    overconfident = _softmax(3.0 * z)  # what a model trained too long says: the true logits times 3
    t = fit_temperature(overconfident, y)
    assert t == pytest.approx(3.0, rel=0.1)
    assert nll(calibrate(overconfident, t), y) < nll(overconfident, y) - 0.1
    assert ece(calibrate(overconfident, t), y) < ece(overconfident, y) / 2
    np.testing.assert_array_equal(calibrate(overconfident, t).argmax(1), overconfident.argmax(1))


def test_temperature_stays_finite_when_validation_is_all_right():
    probs = np.array([[0.7, 0.3], [0.2, 0.8]] * 10)
    y = np.array([0, 1] * 10)
    t = fit_temperature(probs, y)
    assert 0.05 < t < 1.0  # sharpened, but not to certainty (Platt's targets: 1 - 1/22)
    assert calibrate(probs, t).max() < 0.99
    certain = np.array([[0.999, 0.001], [0.002, 0.998]] * 10)
    assert fit_temperature(certain, y) == 1.0  # all right and sure of it: nothing says soften


def test_ece_of_hand_made_confidences():
    right = np.array([[0.8, 0.2]] * 10)
    y = np.array([0] * 8 + [1] * 2)  # 80% confident, 80% right
    assert ece(right, y) == pytest.approx(0.0)
    over = np.array([[0.9, 0.1]] * 10)
    y = np.array([0] * 5 + [1] * 5)  # 90% confident, 50% right
    assert ece(over, y) == pytest.approx(0.4)


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


@pytest.fixture(scope="module")
def decided_run(tmp_path_factory):
    """A run that errs now and then (one epoch on small dots), evaluated: scores and temperature stored."""
    from core.infer.evaluate import evaluate_run
    from core.runs import life as runs
    from core.runs.life import prepare_run
    from core.train.loop import fit
    from core.workspace.store import Workspace
    tmp = tmp_path_factory.mktemp("decide")
    data = write_class_folders(tmp / "dots", per_class=60, size=32, seed=5)
    ws = Workspace(tmp / "ws")
    run = prepare_run(ws, tiny_config(data, image_size=32, epochs=1))
    assert runs.execute(ws, run.id, lambda: fit(ws, run), runs.Reporter())["status"] == "done"
    metrics = evaluate_run(ws, run)
    return ws, run, metrics, data


def test_evaluation_stores_the_calibration_and_shows_calibrated_probabilities(decided_run):
    ws, run, m, _ = decided_run
    cal = run.calibration()
    assert cal["temperature"] == m["temperature"] and cal["n_val"] >= MIN_VAL_FOR_CALIBRATION
    assert m["ece_before"] >= 0 and m["ece_after"] >= 0
    assert cal["val_nll_after"] <= cal["val_nll_before"]  # the fit is never worse on what it was fitted on
    sc = load_scores(run)
    from core.infer.evaluate import read_predictions
    rows = read_predictions(run)
    shown = np.array([[float(r["p_blank"]), float(r["p_dot"])] for r in rows])
    np.testing.assert_allclose(shown, calibrate(sc.test_probs, cal["temperature"]), atol=2e-6)
    from core.deploy.predict import get_predictor
    res = get_predictor(ws, run.id).predict([rows[0]["path"]])[0]
    assert res["probs"]["dot"] == pytest.approx(float(rows[0]["p_dot"]), abs=1e-4)  # Predict says what Evaluate said
    assert "decision" not in res  # no rule chosen yet


def test_decide_cli_saves_a_rule_that_predict_and_the_table_use(decided_run, tmp_path):
    ws, run, _, data = decided_run
    env_cmd = [sys.executable, "-m", "core", "--workspace", str(ws.root)]
    out = subprocess.run(env_cmd + ["decide", run.id, "--positive", "dot", "--cost-miss", "10",
                                    "--cost-false-alarm", "1", "--target-accuracy", "0.95", "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    for key in ("threshold", "test_cost", "test_cost_argmax", "band", "coverage", "band_accuracy"):
        assert key in r
    if r["val"]["band_accuracy"] is not None:  # the band's validation accuracy, with its 95% interval
        decided_val = round(r["val"]["coverage"] * r["val"]["n"])
        hits = round(r["val"]["band_accuracy"] * decided_val)
        assert r["val_band_interval"] == pytest.approx(list(wilson_interval(hits, decided_val)), abs=1e-4)
        assert r["val_band_interval"][0] <= r["val"]["band_accuracy"] <= r["val_band_interval"][1]
    sc = load_scores(run)
    t = run.temperature()
    # the saved threshold is the cheapest cut on the calibrated validation scores; its test cost is recomputed here
    val_p, test_p = calibrate(sc.val_probs, t)[:, 1], calibrate(sc.test_probs, t)[:, 1]
    assert r["threshold"] == pytest.approx(best_threshold(val_p, sc.val_y == 1, 10, 1))
    decided = (test_p >= r["threshold"]).astype(int)
    assert r["test_cost"] == pytest.approx(10 * ((sc.test_y == 1) & (decided == 0)).sum()
                                           + ((sc.test_y == 0) & (decided == 1)).sum())
    rule = load_rule(run)
    assert rule.positive == "dot" and rule.inputs["cost_miss"] == 10
    from core.infer.evaluate import read_predictions
    rows = read_predictions(run)
    assert {r["decision"] for r in rows} <= {"pass", "fail", "review"} and rows[0]["decision"]
    from core.deploy.predict import get_predictor
    img = next(p for p in (data / "dot").iterdir())
    res = get_predictor(ws, run.id).predict([str(img)])[0]
    assert res["decision"]["verdict"] in ("pass", "fail", "review")
    text = subprocess.run(env_cmd + ["predict", run.id, str(img)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert text.returncode == 0 and res["decision"]["verdict"] in text.stdout
    bad = subprocess.run(env_cmd + ["decide", run.id, "--positive", "cat"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "not one of blank, dot" in bad.stderr
    # a re-evaluation chooses the saved rule again from the same inputs
    from core.infer.evaluate import evaluate_run
    evaluate_run(ws, run)
    assert load_rule(run).inputs == rule.inputs


def test_an_export_carries_the_temperature_and_the_rule(decided_run, tmp_path):
    pytest.importorskip("onnxruntime")
    ws, run, _, data = decided_run
    from core.deploy.export import export_run
    from core.deploy.portable import OnnxPredictor
    from core.deploy.predict import get_predictor
    decide_run(run, positive="dot", cost_miss=5, target_accuracy=0.9)
    out = export_run(ws, run.id, "onnx", tmp_path / "m.onnx")
    assert out["card"]["temperature"] == run.temperature() and out["card"]["rule"]["positive"] == "dot"
    images = [str(p) for p in sorted((data / "dot").iterdir())[:4] + sorted((data / "blank").iterdir())[:4]]
    onnx, studio = OnnxPredictor(out["path"]).predict(images), get_predictor(ws, run.id).predict(images)
    for a, b in zip(onnx, studio):
        assert a["probs"]["dot"] == pytest.approx(b["probs"]["dot"], abs=0.02)  # fp32 graph vs the run's precision
        if abs(b["decision"]["margin"]) > 0.2:  # away from a boundary both decide alike
            assert a["decision"]["verdict"] == b["decision"]["verdict"]


# --- how many more images: the learning curve ------------------------------------------------------------------

def test_power_law_fit_recovers_known_parameters():
    from core.studies.learning_curve import fit_power_law, power_law_at
    n = np.array([100, 200, 400, 800, 1600])
    rng = np.random.default_rng(2)
    err = 0.9 * n ** -0.35 * np.exp(rng.normal(0, 0.01, len(n)))
    fit = fit_power_law(n, err)
    assert fit["a"] == pytest.approx(0.9, rel=0.1) and fit["b"] == pytest.approx(0.35, abs=0.02)
    mid, lo, hi = power_law_at(fit, 3200)
    assert lo < 0.9 * 3200 ** -0.35 < hi and mid == pytest.approx(0.9 * 3200 ** -0.35, rel=0.05)
    exact = fit_power_law(n[:4], 0.5 * n[:4] ** -0.5)
    assert exact["b"] == pytest.approx(0.5) and exact["se_b"] == pytest.approx(0, abs=1e-9)


def test_nested_subsets_are_stratified_and_grow_by_adding():
    from core.studies.learning_curve import nested_subsets
    rows = [[f"a{i}", "a"] for i in range(40)] + [[f"b{i}", "b"] for i in range(8)]
    subs = nested_subsets(rows, ["a", "b"], (0.25, 0.5, 1.0), seed=3)
    assert [sum(r[1] == "a" for r in subs[f]) for f in (0.25, 0.5, 1.0)] == [10, 20, 40]
    assert [sum(r[1] == "b" for r in subs[f]) for f in (0.25, 0.5, 1.0)] == [2, 4, 8]
    assert {r[0] for r in subs[0.25]} <= {r[0] for r in subs[0.5]} <= {r[0] for r in subs[1.0]}


def test_learning_curve_job_measures_each_fraction_and_advises(decided_run):
    from core.jobs.queue import JobManager
    from core.runs import life as runs
    from core.studies.learning_curve import latest_for, read_learning_curve
    ws, run, _, _ = decided_run
    jm = JobManager(ws)
    lc_id = jm.submit_learning_curve(run.id, epochs=1)
    assert jm.wait(lc_id, timeout=300).status == "done", ws.run_row(lc_id)["error"]
    lc = read_learning_curve(ws.run(lc_id))
    assert [p["fraction"] for p in lc["points"]] == [0.25, 0.5, 0.75, 1.0]
    n = [p["n_train"] for p in lc["points"]]
    assert n == sorted(n) and n[-1] == len(run.split()["train"])
    assert lc["held_out"] == "test" and len(lc["advice"]) == 2
    assert latest_for(ws, run.id).id == lc_id
    assert runs.last_run(ws, run.config().data).id == run.id  # a study of a run is not offered as its recipe


def test_learning_curve_cli(decided_run):
    ws, run, _, _ = decided_run
    out = subprocess.run([sys.executable, "-m", "core", "--workspace", str(ws.root), "learning-curve", run.id,
                          "--epochs", "1", "--quiet", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["status"] == "done" and len(doc["points"]) == 4 and set(doc["fits"]) == {"blank", "dot"}
