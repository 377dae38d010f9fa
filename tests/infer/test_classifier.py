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


def test_features_come_with_the_same_probabilities_and_never_from_another_threads_batch(small_run):
    """Bug: the features were caught by a hook on the shared model's final layer, so another session's forward
    pass during the call fired it: one user got another's neighbours (or StopIteration with another batch size)."""
    import threading
    pred = Predictor(small_run["run"].best_path)
    clf = pred.classifier
    paths = [r["path"] for r in read_predictions(small_run["run"])]
    batches = [torch.from_numpy(np.stack([pred.image(p) for p in paths[i:i + n]])) for i, n in ((0, 1), (1, 3), (4, 6))]
    alone = [clf.features_and_probs(x) for x in batches]
    for x, (feats, probs) in zip(batches, alone):
        assert np.array_equal(probs, clf.probs(x))  # the same operations as every other consumer's
        assert feats.shape == (len(x), clf.model.fc.in_features if hasattr(clf.model.fc, "in_features")
                               else clf.model.fc[-1].in_features)
    wrong = []

    def user(k: int) -> None:
        for _ in range(15):
            feats, probs = clf.features_and_probs(batches[k])
            if not (np.allclose(feats, alone[k][0], atol=1e-5) and np.allclose(probs, alone[k][1], atol=1e-7)):
                wrong.append(k)

    threads = [threading.Thread(target=user, args=(k,)) for k in (0, 1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


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
