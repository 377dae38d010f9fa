"""Likely label errors by cross-validation, the least-confident queue, and exporting curated labels."""
import json

import numpy as np
import pytest

from conftest import in_process, tiny_config, write_class_folders
from core.data.labels import LabelStore
from core.data.sources import load_dataset
from core.jobs.queue import JobManager
from core.studies.curation import (
    LABEL_ISSUES_FILE,
    describe_noise,
    export_dataset,
    label_issue_scores,
    noise_by_class,
    read_label_report,
)


def test_scores_rank_a_confident_disagreement_first():
    labels = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array([[.9, .1], [.8, .2], [.05, .95], [.1, .9], [.3, .7], [.6, .4]])
    s = label_issue_scores(labels, probs)
    assert s["order"][0] == 2 and s["suggested"][2] == 1
    assert s["normalized_margin"][2] == pytest.approx(-0.9)  # the margin itself, not cleanlab's (margin + 1) / 2
    assert s["label_quality"][2] == pytest.approx(0.05)  # cleanlab's default: self-confidence
    assert bool(s["flagged"][2]) and not s["flagged"][0]


def planted(seed: int = 0, per_class: int = 100, flipped: int = 20):
    """Out-of-sample probabilities of a good model over 3 classes, and labels where `flipped` images of class a were
    given label b: what cleanlab should find, and the noise it should estimate (b is dirty, into a)."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(3), per_class)
    logits = 3.0 * np.eye(3)[truth] + rng.normal(0, 0.7, (len(truth), 3))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = truth.copy()
    wrong = rng.choice(per_class, flipped, replace=False)  # images of class a (the first per_class)
    labels[wrong] = 1
    return labels, probs, set(wrong.tolist())


def test_cleanlab_finds_planted_flips_and_estimates_which_class_is_dirty():
    labels, probs, wrong = planted()
    s = label_issue_scores(labels, probs)
    # The queue starts with them; what cleanlab flags are flips (it flags conservatively: with a model this even
    # in its confidence, about two thirds of them, pruning by the noise rate it estimates).
    assert len(set(s["order"][:len(wrong)].tolist()) & wrong) >= 0.9 * len(wrong)
    flagged = set(np.flatnonzero(s["flagged"]).tolist())
    assert len(flagged & wrong) >= 0.5 * len(wrong) and len(flagged & wrong) >= 0.9 * len(flagged)
    assert all(s["suggested"][i] == 0 for i in wrong)  # they look like a
    noise = {c["class"]: c for c in noise_by_class(s["joint"], ["a", "b", "c"])}
    # b is the dirty class, and into a; nothing else is
    assert noise["b"]["into"]["a"] >= 0.05 and noise["b"]["into"]["c"] < 0.02
    assert noise["a"]["mislabeled"] < 0.02 and noise["c"]["mislabeled"] < 0.02
    assert "of the images labelled b look like a" in describe_noise(list(noise.values()))[0]


def test_a_report_written_before_cleanlab_still_reads(workspace):
    run = workspace.create_run(tiny_config("/data"), "d")
    (run.dir / LABEL_ISSUES_FILE).write_text(json.dumps({"classes": ["a", "b"], "folds": 4, "issues": [
        {"path": "/x.png", "given": "a", "suggested": "b", "self_confidence": 0.1, "normalized_margin": -0.8,
         "candidate": True, "dataset": "d"}]}))
    report = read_label_report(run)
    assert report["noise"] == [] and "before cleanlab" in report["method"]
    assert report["issues"][0]["flagged"] is True and report["issues"][0]["label_quality"] == -0.8


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
    report = read_label_report(workspace.run(run_id))
    issues = report["issues"]
    assert len(issues) == 120 and report["method"].startswith("cleanlab")
    top = {i["path"] for i in issues[: 2 * len(flipped)]}
    assert len(top & flipped) >= 0.7 * len(flipped)
    assert [c["class"] for c in report["noise"]] == ["blank", "dot"]
    assert all(0.0 <= c["mislabeled"] <= 1.0 for c in report["noise"])
    assert np.array(report["confusion"]).sum() == 120


@pytest.mark.slow  # trains two folds
def test_label_errors_from_the_command_line(tmp_path, capsys):
    root = write_class_folders(tmp_path / "d", per_class=16, size=32, seed=4)
    ws = tmp_path / "ws"
    status, out, err = in_process(capsys, "label-errors", "--data", root, "--folds", "2", "--epochs", "1",
                                  "--image-size", "32", "--json", ws=ws)
    assert status == 0, err
    doc = json.loads(out)
    assert doc["images"] == 32 and doc["classes"] == ["blank", "dot"] and doc["folds"] == 2
    assert all(i["flagged"] for i in doc["issues"]) and len(doc["issues"]) == doc["flagged"]
    assert {c["class"] for c in doc["noise"]} == {"blank", "dot"}
    status, out, err = in_process(capsys, "label-errors", doc["run_id"], "--data", root, ws=ws)
    assert status == 2 and err.startswith("error: data: give a run id")
    status, out, err = in_process(capsys, "label-errors", "--data", root, "--folds", "11", ws=ws)
    assert status == 2 and "folds" in err


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
