"""Evaluation: metrics against a hand-computed confusion matrix, the per-image table."""
import numpy as np
import pytest

from core.infer.evaluate import compute_metrics, gallery, read_predictions


def test_metrics_match_a_hand_computed_confusion_matrix():
    classes = ["a", "b", "c"]
    y_true = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    y_pred = np.array([0, 0, 1, 1, 2, 2, 2, 2, 0])
    probs = np.full((9, 3), 0.1)
    probs[np.arange(9), y_pred] = 0.8
    m = compute_metrics(y_true, probs, classes)
    # rows true, columns predicted
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [1, 0, 3]]
    assert m["accuracy"] == pytest.approx(6 / 9)
    pc = {r["class"]: r for r in m["per_class"]}
    # a: tp 2, predicted 3, support 3 -> p 2/3, r 2/3;  b: tp 1, pred 2, sup 2 -> 1/2, 1/2;
    # c: tp 3, pred 4, sup 4 -> 3/4, 3/4
    assert pc["a"]["precision"] == pytest.approx(2 / 3) and pc["a"]["recall"] == pytest.approx(2 / 3)
    assert pc["b"]["f1"] == pytest.approx(0.5)
    assert pc["c"]["support"] == 4 and pc["c"]["f1"] == pytest.approx(0.75)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0.75) / 3)
    assert m["weighted_f1"] == pytest.approx((3 * 2 / 3 + 2 * 0.5 + 4 * 0.75) / 9)
    p_true = np.where(y_true == y_pred, 0.8, 0.1)
    assert m["loss"] == pytest.approx(-np.log(p_true).mean())


def test_run_evaluation_is_saved_with_per_image_table(trained):
    run = trained["run"]
    ev = run.evaluation()
    assert ev["split"] == "test" and ev["n"] == len(run.split()["test"])
    rows = read_predictions(run)
    assert len(rows) == ev["n"]
    assert {"path", "true", "predicted", "confidence", "loss", "p_blank", "p_dot"} <= set(rows[0])
    acc = np.mean([r["true"] == r["predicted"] for r in rows])
    assert acc == pytest.approx(ev["accuracy"])
    assert sum(map(sum, ev["confusion_matrix"])) == ev["n"]
    wrong = gallery(run)
    assert [r["loss"] for r in wrong] == sorted((r["loss"] for r in wrong), reverse=True)
    assert trained["ws"].run_row(run.id)["test_acc"] == pytest.approx(ev["accuracy"])
