"""Likely label errors by cross-validation, the least-confident queue, and exporting curated labels."""
import json

import numpy as np
import pytest

from conftest import tiny_config, write_class_folders
from core.data.labels import LabelStore
from core.data.sources import load_dataset
from core.jobs.queue import JobManager
from core.studies.curation import export_dataset, label_issue_scores, read_label_issues


def test_scores_rank_a_confident_disagreement_first():
    labels = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array([[.9, .1], [.8, .2], [.05, .95], [.1, .9], [.3, .7], [.6, .4]])
    s = label_issue_scores(labels, probs)
    assert s["order"][0] == 2 and s["suggested"][2] == 1
    assert s["normalized_margin"][2] == pytest.approx(-0.9)
    assert bool(s["candidate"][2]) and not s["candidate"][0]


@pytest.mark.slow
def test_crossval_finds_flipped_labels(tmp_path, workspace, monkeypatch):
    root = write_class_folders(tmp_path / "d", per_class=60, size=32, seed=3)
    ds = load_dataset(str(root))
    rng = np.random.default_rng(0)
    flipped = set(ds.samples[i].path for i in rng.choice(len(ds.samples), 12, replace=False))  # 10%
    store = LabelStore(workspace)
    store.set_labels(ds.source, {p: ("blank" if "/dot/" in p else "dot") for p in flipped}, source="import")
    jm = JobManager(workspace)
    run_id = jm.submit_crossval(tiny_config(root, epochs=5, batch_size=16), folds=4)
    snap = jm.wait(run_id, timeout=300)
    assert snap.status == "done", snap.error
    # The 4 folds order the same images differently, and share one decoded copy (the training process's disk cache).
    decoded = [json.loads(f.read_text())["n"] for f in workspace.cache_dir.glob("*.json")]
    assert decoded == [120]
    issues = read_label_issues(workspace.run(run_id))
    assert len(issues) == 120
    top = {i["path"] for i in issues[: 2 * len(flipped)]}
    assert len(top & flipped) >= 0.7 * len(flipped)


def test_export_as_folders_and_csv(dot_folder, tmp_path, workspace):
    ds = load_dataset(str(dot_folder))
    store = LabelStore(workspace)
    store.set_label(ds.source, ds.samples[0].path, "dot", original="blank")
    store.exclude(ds.source, [ds.samples[1].path])
    effective = store.apply(ds)
    out = export_dataset(effective, tmp_path / "export", mode="link")
    assert out["images"] == 59
    exported = load_dataset(str(tmp_path / "export"))
    assert exported.class_counts() == {"blank": 28, "dot": 31}
    export_dataset(effective, tmp_path / "labels.csv", mode="csv")
    assert load_dataset(str(tmp_path / "labels.csv")).class_counts() == {"blank": 28, "dot": 31}
    assert (dot_folder / "blank").exists() and len(list((dot_folder / "blank").iterdir())) == 30  # untouched


def test_least_confident_queue_ranks_by_the_models_top_probability(trained):
    from core.deploy.predict import get_predictor
    from core.studies.curation import least_confident
    pred = get_predictor(trained["ws"], trained["run"].id)
    paths = [r[0] for r in trained["run"].split()["test"]] + ["/no/such/file.png"]
    ranked = least_confident(pred, paths)
    assert [p for p, _ in ranked] and "/no/such/file.png" not in [p for p, _ in ranked]
    probs = [p for _, p in ranked]
    assert probs == sorted(probs) and len(ranked) == len(paths) - 1
    top = {r["path"]: r["top"][0]["prob"] for r in pred.predict(paths[:-1], top_k=1)}
    assert all(abs(top[p] - prob) < 1e-12 for p, prob in ranked)
