"""The embedding map: projections that keep clusters apart, and a run's map, cached."""

import numpy as np
import pytest

from conftest import tiny_config, write_set_with_twins


@pytest.fixture
def twins(tmp_path):
    return write_set_with_twins(tmp_path / "twins")


def test_projections_keep_clusters_apart():
    from core.explain.embedding import project
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (40, 64)) + 8
    b = rng.normal(0, 1, (40, 64)) - 8
    for method in ("pca", "tsne"):
        xy = project(np.concatenate([a, b]), method)
        assert xy.shape == (80, 2) and np.isfinite(xy).all()
        ca, cb = xy[:40].mean(0), xy[40:].mean(0)
        spread = max(xy[:40].std(0).max(), xy[40:].std(0).max())
        assert np.linalg.norm(ca - cb) > 3 * spread, method
    with pytest.raises(Exception, match="unknown map method"):
        project(a, "mds")


def test_run_map_describes_every_image_and_is_cached(twins, workspace):
    from core.explain.embedding import run_map
    from core.runs.life import prepare_run
    from core.train.loop import fit
    root, _ = twins
    run = prepare_run(workspace, tiny_config(root, epochs=2))
    fit(workspace, run)
    m = run_map(workspace, run, "pca")
    n = len(m["path"])
    assert n == sum(len(v) for k, v in run.split().items() if k in ("train", "val", "test"))
    assert all(len(m[k]) == n for k in ("x", "y", "label", "predicted", "confidence", "correct", "part", "label_doubt"))
    assert set(m["part"]) == {"train", "val", "test"}
    # right or wrong agrees with the label doubt: a negative margin means the model prefers another class
    assert all(ok == (d > 0) for ok, d in zip(m["correct"], m["label_doubt"]) if d != 0)
    # the test part's predictions are the evaluation's (one inference path)
    from core.infer.evaluate import read_predictions
    evaluated = {r["path"]: r["predicted"] for r in read_predictions(run)}
    mine = {p: q for p, q, part in zip(m["path"], m["predicted"], m["part"]) if part == "test"}
    assert mine == evaluated
    assert (run.dir / "map-pca.npz").exists()
    assert run_map(workspace, run, "pca")["x"] == m["x"]
