"""The benchmarks that CI runs in their quick form: they must keep working, and print what scripts read."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT


def test_time_to_accuracy_quick_prints_the_ratio_and_both_test_accuracies(tmp_path):
    proc = subprocess.run([sys.executable, "bench/time_to_accuracy.py", "--quick", "--out", str(tmp_path)],
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
    assert doc["precision"] in ("bf16", "fp32", "fp16") and doc["studio"]["recipe"]["epochs"] == 13
    assert all((tmp_path / f).exists() for f in map(lambda p: p.rsplit("/", 1)[-1], doc["curves"]))
    assert len(doc["curves"]) == 2  # the plotly HTML and the PNG


def test_ddp_scaling_prints_images_per_second_for_each_process_count():
    proc = subprocess.run([sys.executable, "bench/ddp_scaling.py", "--procs", "1,2", "--epochs", "2",
                           "--images-per-class", "40", "--image-size", "32", "--batch-size", "16"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["backend"] == "gloo" and [r["processes"] for r in doc["results"]] == [1, 2]
    one, two = doc["results"]
    assert one["images_per_s"] > 0 and two["images_per_s"] > 0 and one["speedup"] == 1.0
    assert two["efficiency"] == round(two["images_per_s"] / (2 * one["images_per_s"]), 2)
