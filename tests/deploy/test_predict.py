"""Prediction of new images: probabilities, unusable files reported, the evaluation's preprocessing."""
import numpy as np
import pytest
from PIL import Image

from conftest import make_dot_image
from core.deploy.predict import get_predictor
from core.infer.evaluate import read_predictions


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
