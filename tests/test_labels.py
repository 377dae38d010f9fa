"""The label store, label-error detection and export."""
import json
import threading

import numpy as np
import pytest

from conftest import tiny_config, write_class_folders
from core.data.labels import LabelStore
from core.data.sources import load_dataset
from core.jobs.queue import JobManager
from core.runs.life import prepare_run
from core.studies.curation import export_dataset, label_issue_scores, read_label_issues
from core.workspace.store import Workspace


def test_history_and_undo(dot_folder, workspace):
    store = LabelStore(workspace)
    ds = load_dataset(str(dot_folder))
    a, b = ds.samples[0].path, ds.samples[1].path
    assert store.version(ds.source) == 0
    v1 = store.set_label(ds.source, a, "dot", original="blank")
    v2 = store.set_labels(ds.source, {a: "other", b: "other"}, source="suggestion", original={b: "blank"})
    assert v2 > v1
    hist = store.history(ds.source, a)
    assert [(h["old_label"], h["new_label"], h["source"]) for h in hist] == [("dot", "other", "suggestion"),
                                                                           ("blank", "dot", "manual")]
    reverted = store.undo(ds.source)  # undoes the two-image action as one
    assert {e["path"] for e in reverted} == {a, b}
    assert store.overrides(ds.source)[a] == ("dot", False)
    assert store.overrides(ds.source)[b][0] in (None, "blank")
    store.undo(ds.source)
    assert store.overrides(ds.source)[a][0] in (None, "blank")
    assert store.undo(ds.source) == []
    assert store.version(ds.source) > v2  # undo is itself recorded


def test_labels_survive_a_restart(dot_folder, tmp_path):
    ds = load_dataset(str(dot_folder))
    LabelStore(Workspace(tmp_path / "ws")).set_label(ds.source, ds.samples[0].path, "dot", original="blank")
    again = LabelStore(Workspace(tmp_path / "ws"))  # a new process opening the same workspace
    assert again.overrides(ds.source)[ds.samples[0].path] == ("dot", False)


def test_two_concurrent_writers_lose_nothing(dot_folder, workspace):
    ds = load_dataset(str(dot_folder))
    paths = [s.path for s in ds.samples]

    def writer(k):
        store = LabelStore(workspace)  # each session has its own store and connections
        for p in paths[k::2]:
            store.set_label(ds.source, p, f"w{k}")

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    over = LabelStore(workspace).overrides(ds.source)
    assert len(over) == len(paths)
    assert all(over[p][0] == f"w{i % 2}" for i, p in enumerate(paths))
    assert len(LabelStore(workspace).history(ds.source, limit=1000)) == len(paths)


def test_training_uses_effective_labels_and_records_the_version(tmp_path, workspace):
    root = write_class_folders(tmp_path / "d", per_class=12, size=16)
    (root / "unlabeled").mkdir()
    write_class_folders(tmp_path / "u", per_class=3, size=16)
    for f in (tmp_path / "u" / "dot").iterdir():
        f.rename(root / "unlabeled" / f.name)
    ds = load_dataset(str(root))
    assert ds.classes == ["blank", "dot"] and len(ds.unlabeled) == 3
    store = LabelStore(workspace)
    moved, dropped = ds.samples[0].path, ds.samples[1].path
    store.set_label(ds.source, moved, "dot", original="blank")
    store.exclude(ds.source, [dropped])
    store.set_label(ds.source, ds.unlabeled[0], "dot", source="suggestion")
    version = store.version(ds.source)
    run = prepare_run(workspace, tiny_config(root, epochs=1, batch_size=4))
    assert workspace.run_row(run.id)["label_version"] == version
    split = run.split()
    rows = {r[0]: r[1] for part in ("train", "val", "test") for r in split[part]}
    assert rows[moved] == "dot" and dropped not in rows and rows[ds.unlabeled[0]] == "dot"
    assert len(rows) == 24 - 1 + 1


def test_scores_rank_a_confident_disagreement_first():
    labels = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array([[.9, .1], [.8, .2], [.05, .95], [.1, .9], [.3, .7], [.6, .4]])
    s = label_issue_scores(labels, probs)
    assert s["order"][0] == 2 and s["suggested"][2] == 1
    assert s["normalized_margin"][2] == pytest.approx(-0.9)
    assert bool(s["candidate"][2]) and not s["candidate"][0]


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
