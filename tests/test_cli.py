"""The command line, end to end, as a user runs it (a subprocess per command)."""
import json
import subprocess
import sys

from conftest import ROOT, write_class_folders


def cli(*args, ws, check=True):
    proc = subprocess.run([sys.executable, "-m", "core", "--workspace", str(ws), *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_train_evaluate_predict_runs(tmp_path):
    data = write_class_folders(tmp_path / "dots", per_class=30, size=48)
    (data / "dot" / "broken.png").write_bytes(b"oops")
    ws = tmp_path / "ws"
    train = cli("train", "--data", data, "--weights", "none", "--epochs", 3, "--batch-size", 16,
                "--image-size", 32, "--set", "hflip=false", ws=ws)
    run_id = train.stdout.strip().splitlines()[-1]
    assert "epoch 3/3" in train.stderr and "1 files skipped" in train.stderr
    assert "test accuracy" in train.stderr

    ev = json.loads(cli("evaluate", run_id, "--json", ws=ws).stdout)
    assert ev["classes"] == ["blank", "dot"] and len(ev["confusion_matrix"]) == 2
    assert 0 <= ev["accuracy"] <= 1 and "macro_f1" in ev
    text = cli("evaluate", run_id, ws=ws).stdout
    assert "confusion matrix" in text and "precision" in text

    img = sorted((data / "dot").glob("dot_*.png"))[0]
    out = json.loads(cli("predict", run_id, img, data / "dot" / "broken.png", "--top-k", 2, "--json", ws=ws).stdout)
    assert out[0]["path"] == str(img) and len(out[0]["top"]) == 2
    assert abs(sum(t["prob"] for t in out[0]["top"]) - 1) < 1e-4
    assert "error" in out[1]

    runs = json.loads(cli("runs", "--json", ws=ws).stdout)
    assert [r["id"] for r in runs] == [run_id] and runs[0]["status"] == "done"
    assert runs[0]["test_acc"] == ev["accuracy"]


def test_user_mistakes_are_one_line_errors(tmp_path):
    ws = tmp_path / "ws"
    data = write_class_folders(tmp_path / "dots", per_class=5, size=16)
    cases = [
        (("train", "--data", tmp_path / "nowhere"), "does not exist"),
        (("train", "--data", data, "--lr", "0"), "lr: must be greater than 0"),
        (("train", "--data", data, "--weights", tmp_path / "missing.pth"), "weights"),
        (("train", "--data", data, "--set", "nosuchfield=1"), "nosuchfield: no such config field"),
        (("train", "--data", data, "--set", "hflip=maybe"), "hflip: expected true/false"),
        (("evaluate", "no-such-run"), "no run"),
        (("predict", "no-such-run", "x.png"), "no run"),
    ]
    for args, message in cases:
        proc = cli(*args, ws=ws, check=False)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
