"""A run's features: the nearest training images beside a prediction, "unlike anything in training", outliers."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config, write_set_with_twins
from core.explain.leakage import run_duplicates
from core.explain.neighbours import nearest


@pytest.fixture
def twins(tmp_path):
    return write_set_with_twins(tmp_path / "twins")


def test_nearest_training_image_of_a_twin_is_its_twin(twins, workspace):
    # Features of a briefly trained model: a near-identical image lands near its twin whatever the model learnt.
    from core.explain.features import run_features
    from core.runs.life import prepare_run
    from core.train.loop import fit
    root, planted = twins
    run = prepare_run(workspace, tiny_config(root, epochs=1))
    fit(workspace, run)
    rf = run_features(workspace, run)
    assert rf.features.shape == (len(rf.paths), 512)
    train, others = rf.part("train"), np.concatenate([rf.part("val"), rf.part("test")])
    twin_of = {a: b for a, b in planted} | {b: a for a, b in planted}
    idx, sims = nearest(rf.features[others], rf.features[train], k=3)
    checked = 0
    for row, i in enumerate(others):
        twin = twin_of.get(rf.paths[i])
        if twin is not None and twin in {rf.paths[j] for j in train}:
            assert twin in [rf.paths[train[j]] for j in idx[row]]
            assert sims[row, 0] >= sims[row, 1] >= sims[row, 2]
            checked += 1
    assert checked > 0
    # all-vs-all, a row is not its own neighbour
    idx_self, _ = nearest(rf.features, rf.features, k=1, exclude_self=True)
    assert all(idx_self[i, 0] != i for i in range(len(rf.paths)))
    # cached with the run; a new checkpoint makes it stale
    assert (run.dir / "features.npz").exists()
    again = run_features(workspace, run)
    assert again.paths == rf.paths and np.allclose(again.features, rf.features)
    by_features = run_duplicates(workspace, run, by=("features",), similarity=0.9999)
    assert {frozenset(m["path"] for m in g["members"]) for g in by_features["groups"]} >= {
        frozenset(p) for p in planted if Path(p[0]).read_bytes() == Path(p[1]).read_bytes()}  # identical features


def test_prediction_evidence_names_the_twin_and_flags_the_unfamiliar(twins, workspace):
    from core.deploy.predict import nearest_training
    from core.explain.features import training_neighbours
    from core.runs.life import prepare_run
    from core.train.loop import fit
    root, planted = twins
    run = prepare_run(workspace, tiny_config(root, epochs=2))
    fit(workspace, run)
    index = training_neighbours(workspace, run)
    train = set(index.paths)
    twin_of = {a: b for a, b in planted} | {b: a for a, b in planted}
    asked = [p for p in twin_of if p not in train and twin_of[p] in train]
    assert asked
    stripes = np.zeros((48, 48, 3), dtype=np.uint8)
    stripes[:, ::4] = 255  # nothing like the noise-and-square images it was trained on
    found = nearest_training(workspace, run.id, asked + [Image.fromarray(stripes), b"not an image"], k=3)
    for path, r in zip(asked, found):
        assert twin_of[path] in [n["path"] for n in r["neighbours"]]
        assert not r["unlike"]
        labels = {n["path"]: n["label"] for n in r["neighbours"]}
        assert labels[twin_of[path]] == Path(twin_of[path]).parent.name
    # the stripes lie farther from every training image than a typical validation image does
    assert found[-2]["distance"] > np.median(index.val_distance)
    assert all(r["unlike"] == (r["distance"] > index.threshold) for r in found[:-1])
    assert "error" in found[-1]
    # the threshold is the validation part's 95th percentile: about one validation image in 20 is "unlike"
    assert np.mean(index.val_distance > index.threshold) <= 0.05 + 1 / len(index.val_distance)


def test_unlike_means_beyond_the_validation_percentile():
    from core.explain.features import TrainingNeighbours
    from core.explain.neighbours import normalize_rows
    rng = np.random.default_rng(0)
    train = rng.normal(0, 1, (50, 8))
    index = TrainingNeighbours(np.zeros(8), normalize_rows(train), train, [f"t{i}" for i in range(50)], ["a"] * 50,
                               threshold=1.0, val_distance=np.array([0.5, 0.8]))
    near, far = train[3] + 0.01, train[3] * 10
    out = index.query(np.stack([near, far]), k=2)
    assert out[0]["neighbours"][0]["path"] == "t3" and out[0]["distance"] < 0.05 and not out[0]["unlike"]
    assert out[1]["neighbours"][0]["path"] == "t3"  # the same direction: the most alike, yet far away
    assert out[1]["distance"] > 1.0 and out[1]["unlike"]


def test_outliers_rank_planted_odd_images_first(tmp_path, workspace):
    from conftest import plant_seeded_weights, write_class_folders
    from core.explain.features import outliers
    from core.runs.life import prepare_run
    from core.train.loop import fit
    root = write_class_folders(tmp_path / "d", per_class=30, size=48)
    odd = []
    for k, c in enumerate(("blank", "dot", "blank")):  # nothing like the noise-and-square images
        a = np.zeros((48, 48, 3), dtype=np.uint8)
        a[:, k::3 + k] = 255
        path = root / c / f"odd_{k}.png"
        Image.fromarray(a).save(path)
        odd.append(str(path))
    run = prepare_run(workspace, tiny_config(root, epochs=2))
    fit(workspace, run)
    # Features whose response is known on any CPU: a seeded random ResNet's, which tell stripes from noise by far
    # (a 2-epoch model's ranking moved with the CPU's thread count).
    plant_seeded_weights(run.best_path)
    ranked = outliers(workspace, run)
    assert len(ranked) == sum(len(v) for k, v in run.split().items() if k in ("train", "val", "test"))
    assert [r["distance"] for r in ranked] == sorted((r["distance"] for r in ranked), reverse=True)
    top = [r["path"] for r in ranked[:len(ranked) // 10]]
    assert set(odd) <= set(top), [(r["path"].rsplit("/", 1)[-1], round(r["distance"], 2)) for r in ranked[:8]]
    assert all(r["far"] for r in ranked if r["path"] in odd and r["part"] != "val")
