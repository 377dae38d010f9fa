"""The command line, end to end, as a user runs it: a process of its own for the commands that train (and for one
mistake); the same main() in this process for those that read a run or refuse."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, in_process, write_class_folders

pytestmark = pytest.mark.slow  # each starts processes of its own (see tests/README.md)


def cli(*args, ws, check=True):
    proc = subprocess.run([sys.executable, "-m", "core", "--workspace", str(ws), *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_train_evaluate_predict_runs(tmp_path, capsys):
    data = write_class_folders(tmp_path / "dots", per_class=30, size=48)
    (data / "dot" / "broken.png").write_bytes(b"oops")
    whole = (data / "blank" / "blank_000.png").read_bytes()
    (data / "blank" / "cut.png").write_bytes(whole[: len(whole) // 2])  # a good header: fails only at decoding
    ws = tmp_path / "ws"
    train = cli("train", "--data", data, "--weights", "none", "--epochs", 3, "--batch-size", 16,
                "--image-size", 32, "--set", "hflip=false", "--json", ws=ws)
    result = json.loads(train.stdout)
    run_id = result["run_id"]
    assert result["status"] == "done" and 0 <= result["test_acc"] <= 1
    # The auto recipe by default, with what was typed kept, and said before training.
    assert "3 epochs (as set)" in result["recipe"]["why"] and result["recipe"]["estimate_seconds"] > 0
    assert "auto recipe:" in train.stderr and "estimate: about" in train.stderr
    assert "epoch 3/3" in train.stderr and "1 files skipped" in train.stderr
    assert "test accuracy" in train.stderr
    # Every skipped file is named with its reason: in the output, the JSON, the run's log and its evaluation.
    skipped = {s["path"]: s["reason"] for s in result["skipped"]}
    kinds = {s["path"]: s["kind"] for s in result["skipped"]}
    assert kinds == {str(data / "dot" / "broken.png"): "not an image", str(data / "blank" / "cut.png"): "truncated"}
    assert "not a recognised image" in skipped[str(data / "dot" / "broken.png")]
    assert "truncated" in skipped[str(data / "blank" / "cut.png")]
    log = (ws / "runs" / run_id / "log.txt").read_text()
    for path, reason in skipped.items():
        assert f"{path}: {reason}" in train.stderr and f"{path}: {reason}" in log

    ev = json.loads(in_process(capsys, "evaluate", run_id, "--json", ws=ws)[1])
    assert ev["classes"] == ["blank", "dot"] and len(ev["confusion_matrix"]) == 2
    assert 0 <= ev["accuracy"] <= 1 and "macro_f1" in ev
    status, text, _ = in_process(capsys, "evaluate", run_id, ws=ws)
    assert status == 0 and "confusion matrix" in text and "precision" in text

    img = sorted((data / "dot").glob("dot_*.png"))[0]
    out = json.loads(in_process(capsys, "predict", run_id, img, data / "dot" / "broken.png", "--top-k", 2, "--json",
                                ws=ws)[1])
    assert out[0]["path"] == str(img) and len(out[0]["top"]) == 2
    assert abs(sum(t["prob"] for t in out[0]["top"]) - 1) < 1e-4
    assert "error" in out[1]

    assert {s["path"] for s in ev["skipped"]} == set(skipped)
    runs = json.loads(in_process(capsys, "runs", "--json", ws=ws)[1])
    assert [r["id"] for r in runs] == [run_id] and runs[0]["status"] == "done"
    assert runs[0]["test_acc"] == ev["accuracy"]

    # Train a finished run on: the same operation as the Runs page, from the command line.
    resumed = json.loads(cli("resume", run_id, "--epochs", 4, "--json", ws=ws).stdout)
    assert resumed["status"] == "done" and resumed["epochs_done"] == 4
    runs = json.loads(in_process(capsys, "runs", "--json", ws=ws)[1])
    assert (runs[0]["epochs_done"], runs[0]["epochs"], runs[0]["status"]) == (4, 4, "done")
    status, _, err = in_process(capsys, "resume", run_id, "--epochs", 4, ws=ws)
    assert status == 2 and "ask for more than 4" in err


def test_typed_flags_win_over_a_preset_even_at_their_default():
    """Bug: `--preset "small grayscale inspection" --epochs 10` trained the preset's 60 epochs, because 10 is
    also the flag's default."""
    from core.cli.parser import build_parser
    from core.cli.train import config_from_args
    from core.config import PRESETS, TrainConfig
    preset = PRESETS["small grayscale inspection"]
    args = build_parser().parse_args(["train", "--data", "x", "--preset", "small grayscale inspection",
                                      "--epochs", "10", "--lr", "0.001", "--weights", "imagenet",
                                      "--normalization", "imagenet"])
    cfg = config_from_args(args)
    defaults = TrainConfig()
    assert (cfg.epochs, cfg.lr, cfg.weights, cfg.normalization) == (10, 1e-3, "imagenet", "imagenet")
    assert (defaults.epochs, defaults.lr, defaults.weights, defaults.normalization) == (10, 1e-3, "imagenet", "imagenet")
    assert (cfg.image_size, cfg.optimizer, cfg.schedule) == (preset["image_size"], "adamw", "onecycle")  # not typed
    assert cfg.extra["preset"] == "small grayscale inspection"
    classic = config_from_args(build_parser().parse_args(["train", "--data", "x", "--recipe", "classic"]))
    assert classic.to_dict() == TrainConfig(data="x", extra={"preset": "classic"}).to_dict()
    assert build_parser().parse_args(["train", "--data", "x"]).recipe == "auto"  # the default


def test_user_mistakes_are_one_line_errors(tmp_path, capsys):
    ws = tmp_path / "ws"
    data = write_class_folders(tmp_path / "dots", per_class=5, size=16)
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    (tmp_path / "zeros.pth").write_bytes(b"\0" * 64)
    import torch
    torch.save({"fc.weight": torch.zeros(2, 512)}, tmp_path / "head_only.pth")  # loads, but not a resnet18
    cases = [
        (("train", "--data", tmp_path / "nowhere"), "does not exist"),
        (("train", "--data", data, "--lr", "0"), "lr: must be greater than 0"),
        (("train", "--data", data, "--weights", tmp_path / "missing.pth"), "weights"),
        (("train", "--data", data, "--weights", tmp_path / "notes.pth"), "weights: weights file notes.pth"),
        (("train", "--data", data, "--weights", tmp_path / "zeros.pth"), "weights: weights file zeros.pth"),
        (("train", "--data", data, "--weights", tmp_path / "head_only.pth"), "does not match resnet18"),
        (("train", "--data", data, "--set", "nosuchfield=1"), "nosuchfield: no such config field"),
        (("train", "--data", data, "--set", "hflip=maybe"), "hflip: expected true/false"),
        (("evaluate", "no-such-run"), "no run"),
        (("predict", "no-such-run", "x.png"), "no run"),
        (("resume", "no-such-run"), "no run"),
    ]
    # One as a user meets it, in a process of its own; the rest through the same main() in this process (each
    # process start costs seconds of imports, and the exit status and stderr are main()'s either way).
    (args, message), rest = cases[0], cases[1:]
    proc = cli(*args, ws=ws, check=False)
    assert proc.returncode == 2, (args, proc.stderr)
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    from core.cli.main import main
    for args, message in rest:
        capsys.readouterr()
        assert main(["--workspace", str(ws), *map(str, args)]) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
    from core.workspace.store import Workspace
    assert Workspace(ws).list_runs() == []  # no mistake became a run


def test_train_estimate_trains_nothing(tmp_path, capsys):
    data = write_class_folders(tmp_path / "dots", per_class=10, size=16)
    ws = tmp_path / "ws"
    status, out, _ = in_process(capsys, "train", "--data", data, "--weights", "none", "--image-size", 32,
                                "--batch-size", 4, "--estimate", ws=ws)
    assert status == 0 and out.startswith("about ") and "on this machine" in out
    assert "auto recipe:" in out and "32 px" in out  # typed flags win over auto's choices
    status, classic, _ = in_process(capsys, "train", "--data", data, "--recipe", "classic", "--weights", "none",
                                    "--batch-size", 4, "--estimate", ws=ws)
    assert status == 0 and classic.startswith("about ") and "auto recipe" not in classic
    assert json.loads(in_process(capsys, "runs", "--json", ws=ws)[1]) == []


def test_golden_made_shown_and_relabelled_from_the_command_line(decided_run, tmp_path, capsys):
    """`core golden`: carved from a run's test part, shown as JSON, a label changed with a reason; mistakes are one
    line and exit 2; `core runs` shows the golden score beside the test score once the run is scored."""
    import shutil
    ws0, run, _, data = decided_run
    root = tmp_path / "ws"
    shutil.copytree(ws0.root, root)
    status, out, err = in_process(capsys, "golden", "--data", data, ws=root)
    assert status == 0 and "has no golden set" in out
    status, out, err = in_process(capsys, "golden", "--data", data, "--from-test", run.id, "--share", "0.5", ws=root)
    assert status == 0 and "golden set of" in out and "version 1" in out, err
    status, out, err = in_process(capsys, "golden", "--data", data, "--json", ws=root)
    info = json.loads(out)
    assert info["version"] == 1 and info["n"] == sum(info["counts"].values()) > 0
    first = info["images"][0]
    other = next(c for c in ("blank", "dot") if c != first["label"])
    status, out, err = in_process(capsys, "golden", "--data", data, "--relabel", f"{first['sha256'][:10]}={other}",
                                  ws=root)
    assert status == 2 and "only with a reason" in err and err.count("\n") == 1
    status, out, err = in_process(capsys, "golden", "--data", data, "--relabel", f"{first['path']}={other}",
                                  "--reason", "checked under the microscope", "--json", ws=root)
    assert status == 0 and json.loads(out)["version"] == 2
    status, out, err = in_process(capsys, "golden", "--data", data, "--from-test", run.id, ws=root)
    assert status == 2 and "chosen once" in err
    status, out, err = in_process(capsys, "golden", "--data", data, "--relabel", "00000000=blank", "--reason", "x",
                                  ws=root)
    assert status == 2 and "names no image" in err
    status, out, err = in_process(capsys, "golden", "--data", data, "--relabel", f"{first['path']}=cat", ws=root)
    assert status == 2 and "IMAGE=LABEL with LABEL one of blank, dot" in err
    status, out, err = in_process(capsys, "evaluate", run.id, ws=root)
    status, out, err = in_process(capsys, "runs", ws=root)
    assert status == 0 and "golden" in out.splitlines()[0] and " v2" in out
