"""Export: the ONNX and TorchScript files give the studio's probabilities, carry their model card, and a bad
request writes nothing."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, in_process, tiny_config, train_small_run, without_torch
from core.deploy.export import ExportError, export_run, read_onnx_card
from core.infer.classifier import Classifier
from core.infer.evaluate import read_predictions
from core.runs.life import prepare_run


@pytest.fixture(scope="module", params=[True, False], ids=["tta-run", "plain-run"])
def exported(request, tmp_path_factory):
    ws, run = train_small_run(tmp_path_factory.mktemp("export"), request.param, seed=7)
    clf = Classifier.from_checkpoint(run.best_path)
    clf.amp = None  # the exported graphs are fp32: compare with the inference path in fp32
    images = np.stack([clf.image(r["path"]) for r in read_predictions(run)])
    return {"ws": ws, "run": run, "clf": clf, "images": images, "tta": request.param}


def _studio_probs(exported, tta):
    clf = exported["clf"]
    clf.tta = tta
    return clf.probs(torch.from_numpy(exported["images"]))


@pytest.mark.slow
@pytest.mark.parametrize("as_run", [True, False], ids=["as-run", "the-other-way"])
def test_onnx_gives_the_studios_probabilities(exported, as_run):
    """With the run's own test-time flips (or none), and asked for the other way: the two runs cover both."""
    import onnxruntime as ort
    tta = None if as_run else not exported["tta"]
    out = export_run(exported["ws"], exported["run"].id, "onnx", tta=tta)
    want_tta = exported["tta"] if tta is None else tta
    session = ort.InferenceSession(out["path"], providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": exported["images"]})[0]
    assert got.shape == (len(exported["images"]), 2)
    assert np.abs(got - _studio_probs(exported, want_tta)).max() < 1e-4
    one = session.run(None, {"images": exported["images"][:1]})[0]  # the batch size is free
    assert np.abs(one - got[:1]).max() < 1e-4
    card = read_onnx_card(out["path"])
    assert card == json.loads(open(out["card_path"]).read())
    assert card["classes"] == ["blank", "dot"] and (card["input"]["height"], card["input"]["width"]) == (48, 48)
    assert card["tta"].startswith("mean of the image") is want_tta
    assert card["normalization"] == exported["clf"].meta["normalization"]
    assert card["test_metrics"]["accuracy"] == exported["run"].evaluation()["accuracy"]
    assert len(card["dataset_sha256"]) == 64


def test_torchscript_gives_the_studios_probabilities(exported):
    out = export_run(exported["ws"], exported["run"].id, "torchscript")
    files = {"model_card.json": ""}
    module = torch.jit.load(out["path"], _extra_files=files)
    got = module(torch.from_numpy(exported["images"])).detach().numpy()
    assert np.abs(got - _studio_probs(exported, exported["tta"])).max() < 1e-4
    assert json.loads(files["model_card.json"])["run_id"] == exported["run"].id


def test_bad_exports_say_why_and_leave_nothing(exported, tmp_path, dot_folder, workspace):
    ws, run = exported["ws"], exported["run"]
    with pytest.raises(ExportError, match="unknown format 'tflite'"):
        export_run(ws, run.id, "tflite")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ExportError, match="cannot write"):
        export_run(ws, run.id, "onnx", out=blocker / "model.onnx")
    fresh = prepare_run(workspace, tiny_config(dot_folder))
    with pytest.raises(ExportError, match="no best checkpoint"):
        export_run(workspace, fresh.id, "onnx")
    assert not (fresh.dir / "exports").exists()
    left = [p for p in (run.dir / "exports").iterdir() if p.name.endswith(".tmp")] if (run.dir / "exports").exists() else []
    assert left == []


@pytest.mark.slow
def test_export_from_the_command_line(trained, tmp_path, capsys):
    out = tmp_path / "line-side" / "model.onnx"
    proc = subprocess.run([sys.executable, "-m", "core", "--workspace", str(trained["ws"].root), "export",
                           trained["run"].id, "--out", str(out), "--json"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["path"] == str(out) and out.exists() and (tmp_path / "line-side" / "model.onnx.card.json").exists()
    assert result["card"]["input"]["height"] == trained["size"]
    status, _, err = in_process(capsys, "export", "no-such-run", ws=trained["ws"].root)  # main(), in this process
    assert status == 2 and "no run" in err and "Traceback" not in err


@pytest.mark.slow
# The run with test-time views only: they are inside the graph, and the predictor is the same code for both runs.
@pytest.mark.parametrize("exported", [True], ids=["tta-run"], indirect=True)
def test_predict_from_onnx_without_torch(exported, tmp_path):
    """The line-side PC: `core predict --model FILE.onnx` in a process where importing torch fails."""
    model = tmp_path / "model.onnx"
    export_run(exported["ws"], exported["run"].id, "onnx", out=model)
    env = without_torch(tmp_path)
    paths = [r["path"] for r in read_predictions(exported["run"])][:6]
    (tmp_path / "junk.png").write_bytes(b"not an image")
    proc = subprocess.run([sys.executable, "-m", "core", "predict", "--model", str(model), *paths,
                           str(tmp_path / "junk.png"), "--top-k", "2", "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert "not a recognised image" in results[-1]["error"]
    want = _studio_probs(exported, exported["tta"])[: len(paths)]
    got = np.array([[r["probs"]["blank"], r["probs"]["dot"]] for r in results[:-1]])
    assert np.abs(got - want).max() < 1e-4
    assert [r["top"][0]["label"] for r in results[:-1]] == [["blank", "dot"][i] for i in want.argmax(1)]
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert "not installed on this machine" in check.stderr  # the process really had no torch
    bad = subprocess.run([sys.executable, "-m", "core", "predict", "--model", str(tmp_path / "junk.png"),
                          paths[0]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "not a usable ONNX model" in bad.stderr and "Traceback" not in bad.stderr


def test_the_cli_names_the_export_formats_without_importing_torch():
    from core.cli.deploy import EXPORT_FORMATS
    from core.deploy.export import FORMATS
    assert tuple(FORMATS) == EXPORT_FORMATS
