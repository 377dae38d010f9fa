"""A run's stored calibration and rule, end to end: evaluation, `core decide`, prediction, export."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, in_process
from core.decide.calibration import MIN_VAL_FOR_CALIBRATION, calibrate
from core.decide.rule import (
    best_threshold,
    wilson_interval,
)
from core.decide.stored import decide_run, load_rule, load_scores


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


@pytest.mark.slow
def test_decide_cli_saves_a_rule_that_predict_and_the_table_use(decided_run, tmp_path, capsys):
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
    status, text, _ = in_process(capsys, "predict", run.id, img, ws=ws.root)  # main(), in this process
    assert status == 0 and res["decision"]["verdict"] in text
    status, _, err = in_process(capsys, "decide", run.id, "--positive", "cat", ws=ws.root)
    assert status == 2 and "not one of blank, dot" in err
    # a re-evaluation chooses the saved rule again from the same inputs
    from core.infer.evaluate import evaluate_run
    evaluate_run(ws, run)
    assert load_rule(run).inputs == rule.inputs


@pytest.mark.slow
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
