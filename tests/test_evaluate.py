"""Evaluation numbers, Grad-CAM and prediction."""
import numpy as np
import pytest
from PIL import Image

from conftest import make_dot_image
from core.deploy.predict import Predictor, get_predictor
from core.explain.gradcam import METHODS
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


def test_predict_probabilities_sum_to_one_and_bad_files_reported(trained, tmp_path):
    pred = get_predictor(trained["ws"], trained["run"].id)
    assert get_predictor(trained["ws"], trained["run"].id) is pred  # loaded once
    rng = np.random.default_rng(5)
    dot, _ = make_dot_image(rng, trained["size"], dot=True)
    Image.fromarray(dot).save(tmp_path / "dot.png")
    (tmp_path / "junk.jpg").write_bytes(b"junk")
    results = pred.predict([str(tmp_path / "dot.png"), str(tmp_path / "junk.jpg"), Image.fromarray(dot)], top_k=2)
    assert "error" in results[1] and "not a recognised" in results[1]["error"]
    for r in (results[0], results[2]):
        assert sum(r["probs"].values()) == pytest.approx(1.0, abs=1e-5)
        assert r["top"][0]["label"] == "dot"
        assert r["top"][0]["prob"] >= r["top"][1]["prob"]
    assert results[0]["probs"] == pytest.approx(results[2]["probs"], abs=1e-5)  # path and PIL: same input


def test_predictor_uses_the_evaluation_preprocessing(trained):
    """Probabilities from the predictor equal the ones the evaluation saved for the same file (the run's calibration
    temperature included)."""
    run = trained["run"]
    rows = read_predictions(run)[:5]
    pred = get_predictor(trained["ws"], run.id)
    results = pred.predict([r["path"] for r in rows])
    for row, res in zip(rows, results):
        # both run under bf16 autocast where supported, but in different batches (oneDNN may pick other kernels)
        assert res["probs"]["dot"] == pytest.approx(float(row["p_dot"]), abs=0.05)


@pytest.mark.parametrize("method", METHODS)
def test_gradcam_maps_are_unit_range_and_image_sized(trained, method):
    pred = Predictor(trained["run"].best_path)
    rng = np.random.default_rng(3)
    img, _ = make_dot_image(rng, trained["size"], dot=True)
    out = pred.explain(Image.fromarray(img), method=method)
    assert out["heatmap"].shape == (trained["size"],) * 2
    assert out["heatmap"].min() >= 0 and out["heatmap"].max() <= 1
    assert out["overlay"].shape == (trained["size"], trained["size"], 3) and out["overlay"].dtype == np.uint8


def test_gradcam_is_hotter_on_the_deciding_region(trained):
    pred = Predictor(trained["run"].best_path)
    rng = np.random.default_rng(11)
    inside, outside = [], []
    for _ in range(12):
        img, (y, x, s) = make_dot_image(rng, trained["size"], dot=True)
        heat = pred.explain(Image.fromarray(img), target="dot")["heatmap"]
        mask = np.zeros_like(heat, dtype=bool)
        mask[y:y + s, x:x + s] = True
        inside.append(heat[mask].mean())
        outside.append(heat[~mask].mean())
    assert np.mean(inside) > 1.5 * np.mean(outside)


def test_gradcam_does_not_touch_the_prediction_model(trained):
    pred = Predictor(trained["run"].best_path)
    model = pred.classifier.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pred.explain(Image.new("RGB", (64, 64)))
    assert not model._forward_hooks and not model.layer4[-1]._forward_hooks
    for k, v in model.state_dict().items():
        assert (v == before[k]).all()
