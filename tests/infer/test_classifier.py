"""One inference path: every consumer (evaluation, prediction, cross-validation) gets the same probabilities."""

import numpy as np
import pytest
import torch

from conftest import tiny_config, train_small_run, write_class_folders
from core.deploy.predict import Predictor
from core.infer.evaluate import read_predictions
from core.runs import life as runs
from core.runs.life import prepare_run


@pytest.fixture(scope="module", params=[True, False], ids=["tta", "plain"])
def small_run(request, tmp_path_factory):
    ws, run = train_small_run(tmp_path_factory.mktemp("inference"), request.param, seed=3)
    return {"ws": ws, "run": run, "tta": request.param}


def test_every_consumer_gets_the_evaluations_probabilities(small_run):
    """Bug: with TTA the Predict page and `core predict` disagreed with predictions.csv by up to 0.21."""
    run = small_run["run"]
    rows = read_predictions(run)
    assert rows and run.evaluation()["tta"] is small_run["tta"]
    paths = [r["path"] for r in rows]
    saved = np.array([[float(r["p_blank"]), float(r["p_dot"])] for r in rows])
    pred = Predictor(run.best_path)
    batched = np.array([[r["probs"]["blank"], r["probs"]["dot"]] for r in pred.predict(paths)])
    one_by_one = np.array([[r["probs"]["blank"], r["probs"]["dot"]] for p in paths for r in pred.predict(p)])
    explained = np.array([[e["probs"]["blank"], e["probs"]["dot"]] for e in map(pred.explain, paths)])
    for probs in (batched, one_by_one, explained):
        assert np.abs(probs - saved).max() < 1e-5
    # Grad-CAM's top-k is the prediction's top-k
    top = pred.explain(paths[0], top_k=2)["top"]
    assert [t["label"] for t in top] == [t["label"] for t in pred.predict(paths[0], top_k=2)[0]["top"]]
    # The TTA run really averages flips, so the comparison above is between TTA probabilities everywhere. Seen at a
    # high temperature: a well-trained model's probabilities sit at 0 and 1, where flips cannot move them.
    clf = pred.classifier
    x = torch.from_numpy(np.stack([pred.image(p) for p in paths[:8]]))
    tta, temperature = clf.tta, clf.temperature
    try:
        clf.temperature = 1000.0
        clf.tta = True
        with_flips = clf.probs(x)
        clf.tta = False
        without = clf.probs(x)
    finally:
        clf.tta, clf.temperature = tta, temperature
    assert np.abs(with_flips - without).max() > 1e-5
    assert tta is small_run["tta"]


def test_crossval_folds_use_the_same_inference(tmp_path, workspace):
    from core.studies.curation import crossval
    root = write_class_folders(tmp_path / "d", per_class=12, size=32, seed=5)
    run = prepare_run(workspace, tiny_config(root, epochs=1, batch_size=8, tta=True, test_fraction=0.0))
    assert crossval(workspace, run, runs.Reporter(), folds=2)["status"] == "done"
    fold = run.dir / "fold1"
    rows = read_predictions(type(run)(run.id + "-fold1", fold))
    pred = Predictor(fold / "best.pt")
    got = pred.predict([r["path"] for r in rows])
    for r, g in zip(rows, got):
        assert abs(g["probs"]["dot"] - float(r["p_dot"])) < 1e-5
