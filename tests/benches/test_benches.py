"""The benchmarks that CI runs in their quick form: they must keep working, and print what scripts read."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # each starts processes of its own (see tests/README.md)


def test_time_to_accuracy_quick_prints_the_ratio_and_both_test_accuracies(tmp_path):
    # --smoke: --quick's path on a sixteenth of its images and 2 studio epochs (--quick alone took 82-126 s here)
    proc = subprocess.run([sys.executable, "bench/time_to_accuracy.py", "--smoke", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    for key in ("speedup_to_target", "classic_minutes_to_target", "studio_minutes_to_target", "classic_test_acc",
                "studio_test_acc", "precision", "cpu", "device"):
        assert key in doc, key
    assert doc["classic_minutes_to_target"] > 0
    assert 0 <= doc["classic_test_acc"] <= 1 and 0 <= doc["studio_test_acc"] <= 1
    studio = doc["studio"]
    if doc["speedup_to_target"] is None:  # the studio never reached the classic's best validation accuracy
        assert studio["best_val_acc"] < doc["target_val_acc"]
    else:
        assert doc["speedup_to_target"] == pytest.approx(  # computed from the unrounded minutes
            doc["classic_minutes_to_target"] / doc["studio_minutes_to_target"], rel=0.02)
        reached = next(p for p in studio["curve"] if p["val_acc"] >= doc["target_val_acc"])
        assert doc["studio_minutes_to_target"] == round(reached["minutes"], 3)
    assert doc["precision"] in ("bf16", "fp32", "fp16") and doc["studio"]["recipe"]["epochs"] == 2
    assert all((tmp_path / f).exists() for f in map(lambda p: p.rsplit("/", 1)[-1], doc["curves"]))
    assert len(doc["curves"]) == 2  # the plotly HTML and the PNG


def test_ddp_scaling_prints_images_per_second_for_each_process_count():
    proc = subprocess.run([sys.executable, "bench/ddp_scaling.py", "--procs", "1,2", "--epochs", "2",
                           "--images-per-class", "24", "--image-size", "32", "--batch-size", "16"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["backend"] == "gloo" and [r["processes"] for r in doc["results"]] == [1, 2]
    one, two = doc["results"]
    assert one["images_per_s"] > 0 and two["images_per_s"] > 0 and one["speedup"] == 1.0
    assert two["efficiency"] == round(two["images_per_s"] / (2 * one["images_per_s"]), 2)


def test_elpv_accuracy_reports_recall_per_class_as_a_mean_over_seeds():
    sys.path.insert(0, str(ROOT / "bench"))
    from elpv_accuracy import per_class_recall
    seeds = [{"confusion_matrix": [[3, 1], [2, 0]]}, {"confusion_matrix": [[2, 2], [1, 3]]}]
    assert per_class_recall(["functional", "defective"], seeds) == {"functional": 0.625, "defective": 0.375}


def test_elpv_accuracy_reads_grade_error_and_the_two_class_answer_off_the_four_class_matrix():
    sys.path.insert(0, str(ROOT / "bench"))
    from elpv_accuracy import grades_summary
    # 25 images; grades off: 1 + 3 (row 0), 2 x 1 (row 1), 1 + 1 (row 2) = 8. Across the 2-class line (grade 2):
    # the 0 called 3 and the 2 called 1.
    cm = [[10, 1, 0, 1], [2, 3, 0, 0], [0, 1, 1, 1], [0, 0, 0, 5]]
    assert grades_summary({"confusion_matrix": cm}) == {"grade_mae": 0.32, "two_class_accuracy_from_grades": 0.92}
    assert grades_summary({"confusion_matrix": [[3, 1], [2, 0]]}) == {}


def test_elpv_accuracy_thresholds_the_defect_grades_on_validation(tmp_path):
    from types import SimpleNamespace

    import numpy as np
    sys.path.insert(0, str(ROOT / "bench"))
    from elpv_accuracy import two_class_threshold_summary
    # p(grade >= 2) of 0.3 already means defective on validation: the threshold moves below 0.5, and the test
    # image at 0.35 is then called defective, rightly.
    val = np.array([[0.7, 0.0, 0.3, 0.0], [0.8, 0.0, 0.2, 0.0], [0.3, 0.0, 0.7, 0.0], [0.9, 0.1, 0.0, 0.0]])
    test = np.array([[0.65, 0.0, 0.35, 0.0], [0.95, 0.05, 0.0, 0.0]])
    path = tmp_path / "scores.npz"
    np.savez(path, classes=np.array(["p=0.00", "p=0.33", "p=0.67", "p=1.00"]), val_probs=val,
             val_y=np.array([2, 0, 3, 1]), test_probs=test, test_y=np.array([2, 0]), test_part=np.array("test"))
    out = two_class_threshold_summary(SimpleNamespace(id="r", scores_path=path))
    assert 0.2 < out["two_class_threshold"] <= 0.3 and out["two_class_accuracy_thresholded"] == 1.0


def test_elpv_accuracy_reports_what_pretraining_cost(tmp_path):
    from types import SimpleNamespace
    sys.path.insert(0, str(ROOT / "bench"))
    from elpv_accuracy import pretraining_summary
    assert pretraining_summary(SimpleNamespace(pretrained_path=tmp_path / "pretrained.pt")) == {}
    (tmp_path / "pretrained.json").write_text(json.dumps({"seconds": 183.4, "epochs": 12, "history": [
        {"loss": 4.1, "view_match": 0.2}, {"loss": 2.51234, "view_match": 0.61}]}))
    assert pretraining_summary(SimpleNamespace(pretrained_path=tmp_path / "pretrained.pt")) == {
        "pretraining_seconds": 183.4, "pretraining_epochs": 12, "pretraining_final_loss": 2.5123,
        "pretraining_view_match": 0.61}


def test_elpv_few_labels_moves_the_rest_of_training_to_unlabeled_and_keeps_validation_and_test():
    sys.path.insert(0, str(ROOT / "bench"))
    from elpv_accuracy import paper_split
    full, few = paper_split(False, 2019), paper_split(False, 2019, labelled=0.1)
    assert few["val"] == full["val"] and few["test"] == full["test"]
    assert "unlabeled" not in full
    kept = {r[0] for r in few["train"]}
    assert kept < {r[0] for r in full["train"]}
    assert kept.isdisjoint(few["unlabeled"])
    assert kept | set(few["unlabeled"]) == {r[0] for r in full["train"]}
    assert abs(len(kept) / len(full["train"]) - 0.1) < 0.02
    assert {r[1] for r in few["train"]} == {"defective", "functional"}  # each stratum keeps some labels


def test_levers_bench_compares_levers_on_the_same_seeds():
    proc = subprocess.run([sys.executable, "bench/levers.py", "--seeds", "0", "--set", "epochs=1", "--lever", "none",
                           "--lever", "ema=true"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert set(doc["levers"]) == {"none", "ema=true"}
    assert 0 <= doc["levers"]["none"]["accuracy_mean"] <= 1 and "paired_difference_mean" in doc["levers"]["ema=true"]
    assert doc["levers"]["ema=true"]["per_seed"][0]["checkpoint_weights"] in ("trained", "averaged")


def test_label_errors_bench_scores_one_case_with_both_scorers_and_puts_the_labels_back(tmp_path):
    """In this process (the bench's parts, on a small generated set): planted flips are found through the studio's
    k-fold job, both scorers read the same probabilities, and the label store ends as it began."""
    sys.path.insert(0, str(ROOT / "bench"))
    import label_errors

    from conftest import write_class_folders
    from core.data.labels import LabelStore
    from core.data.sources import load_dataset
    from core.workspace.store import Workspace
    data = str(write_class_folders(tmp_path / "d", per_class=16, size=32, seed=5))
    ws = Workspace(tmp_path / "ws")
    case = label_errors.one_case(ws, data, 0.125, 0, 2, {"epochs": 1, "image_size": 32, "batch_size": 8})
    assert case["planted"] == 4 and case["images"] == 32
    for scorer in ("studio", "cleanlab_self_confidence", "cleanlab_normalized_margin", "studio_before"):
        assert set(case[scorer]) == {"flagged", "precision", "recall", "top_n_precision"}
        assert all(0 <= case[scorer][k] <= 1 for k in ("precision", "recall", "top_n_precision"))
    # every flipped image is back to its own label (the store may keep the history, not a different label)
    ds = load_dataset(data)
    assert LabelStore(ws).apply(ds).class_counts() == ds.class_counts() == {"blank": 16, "dot": 16}


def test_the_scorer_before_cleanlab_flags_a_confident_disagreement():
    sys.path.insert(0, str(ROOT / "bench"))
    import numpy as np
    from label_errors import measure, old_scores
    flagged, order = old_scores(np.array([0, 0, 0, 1, 1, 1]),
                                np.array([[.9, .1], [.8, .2], [.05, .95], [.1, .9], [.3, .7], [.6, .4]]))
    assert flagged.tolist() == [False, False, True, False, False, True] and order[0] == 2
    assert measure(flagged, order, {2}) == {"flagged": 2, "precision": 0.5, "recall": 1.0, "top_n_precision": 1.0}
