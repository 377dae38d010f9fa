"""Releases: the gate refuses a candidate trained with a class's labels scrambled (showing where, with both models'
heatmaps), lets a sound one through, and a release is immutable, listed and recorded in the ledger."""
import json
import os
import random
import shutil
import stat

import numpy as np
import pytest

from conftest import in_process, tiny_config, write_class_folders
from core.data.golden import GoldenStore, carve_from_test
from core.data.labels import LabelStore
from core.data.sources import load_dataset
from core.deploy.release import ReleaseError, ledger, list_releases, make_release, verify_release
from core.infer.evaluate import evaluate_run, score_golden
from core.runs import life
from core.train.loop import fit
from core.workspace.store import Workspace

pytestmark = pytest.mark.slow


def _train(ws, data, epochs=4):
    run = life.prepare_run(ws, tiny_config(data, image_size=32, epochs=epochs))
    assert life.execute(ws, run.id, lambda: fit(ws, run), life.Reporter())["status"] == "done"
    evaluate_run(ws, run)
    return run


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    """A dataset with a golden set carved from a sound run's test part (that run never trained on them: it is the
    first release), and two later runs: one trained while two thirds of the `dot` images were labelled `blank` (most
    dot images then say blank: it learns to miss dots whatever the CPU or seed), and one no worse by construction: a
    new run holding the first release's weights, so that its passing the gate never leans on a training's luck."""
    root = tmp_path_factory.mktemp("release")
    data = write_class_folders(root / "dots", per_class=60, size=32, seed=3)
    ws = Workspace(root / "ws")
    sound = _train(ws, data)
    ds = load_dataset(str(data))
    GoldenStore(ws).create(ds.source, carve_from_test(sound.split(), 1.0), "test of the first run", actor="ana")
    score_golden(ws, sound)
    dots = sorted(s.path for s in ds.samples if ds.classes[s.label] == "dot")
    random.Random(0).shuffle(dots)
    labels = LabelStore(ws)
    labels.set_labels(ds.source, {p: "blank" for p in dots[:len(dots) * 2 // 3]}, actor="scrambler")
    scrambled = _train(ws, data)
    labels.undo(ds.source, actor="scrambler")
    again = _train(ws, data, epochs=1)
    shutil.copyfile(sound.best_path, again.best_path)  # the same decisions on every golden image
    evaluate_run(ws, again)
    return {"ws": ws, "data": data, "source": ds.source, "sound": sound, "scrambled": scrambled,
            "again": again}


def test_runs_are_scored_on_the_same_golden_images(lineage):
    ws = lineage["ws"]
    golden = {g.sha256 for g in GoldenStore(ws).images(lineage["source"])}
    for name in ("sound", "scrambled", "again"):
        run = lineage[name]
        summary = json.loads(run.golden_path.read_text())
        assert summary["n"] == len(golden) and summary["trained_on"] == 0 and summary["version"] == 1
        rows = [r.split(",")[0] for r in run.golden_predictions_path.read_text().splitlines()[1:]]
        assert set(rows) == golden
        assert ws.run_row(run.id)["golden_acc"] == summary["accuracy"]
    assert json.loads(lineage["scrambled"].golden_path.read_text())["per_class"][1]["recall"] < 0.5


def test_the_gate_refuses_the_scrambled_run_and_passes_a_sound_one(lineage, capsys):
    ws = lineage["ws"]
    first = make_release(ws, lineage["sound"].id, actor="ana")
    assert first["name"] == "dots-v1" and first["version"] == 1
    assert first["manifest"]["gate"]["first"].startswith("the first release of this dataset")

    status, out, err = in_process(capsys, "release", lineage["scrambled"].id, ws=ws.root)
    assert status == 1 and "refused: the gate refuses run" in out and "recall of dot drops" in out
    report = ledger(ws)[0]["report"]
    assert ledger(ws)[0]["outcome"] == "refused"
    assert report["regressions"] and report["candidate_accuracy"] < report["current_accuracy"]
    pngs = sorted(os.listdir(report["gallery_dir"]))
    assert len(pngs) == len(report["gallery"]["regressions"]) + len(report["gallery"]["fixes"])
    assert all(p.startswith(("regressions-", "fixes-")) for p in pngs) and "current_dot-candidate_blank" in pngs[0]
    from PIL import Image
    w, h = Image.open(os.path.join(report["gallery_dir"], pngs[0])).size
    assert (w, h) == (3 * 32, 32)  # the image, the current release's heatmap, the candidate's
    assert len(list_releases(ws)) == 1

    with pytest.raises(ReleaseError, match="--reason"):
        make_release(ws, lineage["scrambled"].id, force=True)
    status, out, err = in_process(capsys, "release", lineage["again"].id, "--json", ws=ws.root)
    doc = json.loads(out)
    assert status == 0 and doc["released"] and doc["version"] == 2 and not doc["manifest"]["gate"]["refuse"]
    assert [e["outcome"] for e in ledger(ws)][:3] == ["released", "refused", "first"]


def test_the_runs_page_gates_a_release_and_lists_the_releases(lineage, tmp_path, monkeypatch):
    """On a copy of the workspace: the Release button on a refused run shows the reasons and the regression gallery;
    the Releases section lists what was made."""
    from streamlit.testing.v1 import AppTest

    from conftest import ROOT
    root = tmp_path / "ws"
    shutil.copytree(lineage["ws"].root, root)
    monkeypatch.setenv("STUDIO_WORKSPACE", str(root))
    made = list_releases(Workspace(root))
    if not made or made[0]["run_id"] == lineage["scrambled"].id:  # a sound current release to be gated against
        make_release(Workspace(root), lineage["again"].id, gallery=False)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    at.switch_page("pages/runs.py")
    at.run()
    rid = lineage["scrambled"].id
    at.multiselect(key="runs_selected").set_value([rid]).run()
    at.button(key=f"release_{rid}").click().run()
    assert not at.exception, at.exception
    errors = " ".join(e.value for e in at.error)
    assert errors, ([e.value for e in at.success], [e.value for e in at.info])
    assert "the gate refuses run" in errors and "recall of dot drops" in errors
    assert len(at.get("image")) >= 1  # the regression gallery's strips
    table = next(d.value for d in at.dataframe if "version" in d.value.columns)  # the Releases table, newest first
    assert table["run"].tolist()[0] == lineage["again"].id


def test_a_forced_release_is_recorded_with_its_reason(lineage, capsys):
    ws = lineage["ws"]
    if len(list_releases(ws)) < 2:
        pytest.skip("needs the releases of the test above")
    forced = make_release(ws, lineage["scrambled"].id, name="hotfix", actor="ana", force=True,
                          reason="line down, accepted by QA", gallery=False)
    assert forced["forced_reason"] == "line down, accepted by QA" and forced["manifest"]["gate"]["refuse"]
    assert ledger(ws)[0]["outcome"] == "forced" and ledger(ws)[0]["reason"] == "line down, accepted by QA"
    with pytest.raises(ReleaseError, match="exists already"):
        make_release(ws, lineage["again"].id, name="hotfix")
    with pytest.raises(ReleaseError, match="release name '../up'"):  # never a path
        make_release(ws, lineage["again"].id, name="../up")
    status, out, err = in_process(capsys, "releases", ws=ws.root)
    assert status == 0 and out.splitlines()[1].startswith("hotfix") and "(forced: line down" in out


def test_a_release_is_immutable_and_complete(lineage):
    ws = lineage["ws"]
    rel = next(r for r in list_releases(ws) if r["name"] == "dots-v1")
    files = set(rel["manifest"]["files"])
    assert {"model.onnx", "model.onnx.card.json", "rule.json", "golden.json", "golden.csv", "eval.json"} - {
        "rule.json"} <= files
    m = rel["manifest"]
    assert m["run_id"] == lineage["sound"].id and len(m["data_sha256"]) == 64 and m["golden_version"] == 1
    assert m["actor"] == "ana" and m["label_version"] is not None
    for name in files:
        mode = os.stat(os.path.join(rel["dir"], name)).st_mode
        assert not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH), name
    assert verify_release(rel) == []
    path = os.path.join(rel["dir"], "golden.json")
    os.chmod(path, 0o644)
    with open(path, "a") as fh:
        fh.write(" ")
    assert verify_release(rel) == ["golden.json"]


def test_a_release_needs_a_golden_set_and_a_finished_evaluated_run(tmp_path):
    data = write_class_folders(tmp_path / "d", per_class=12, size=24)
    ws = Workspace(tmp_path / "ws")
    run = life.prepare_run(ws, tiny_config(data, image_size=24, epochs=1, batch_size=8))
    with pytest.raises(ReleaseError, match="only a finished run"):
        make_release(ws, run.id)
    assert life.execute(ws, run.id, lambda: fit(ws, run), life.Reporter())["status"] == "done"
    run.eval_path.unlink()  # (training ends with an evaluation)
    with pytest.raises(ReleaseError, match="not been evaluated"):
        make_release(ws, run.id)
    evaluate_run(ws, run)
    with pytest.raises(ReleaseError, match="no golden set"):
        make_release(ws, run.id)
    GoldenStore(ws).create(run.split()["source"], [(r[0], r[1]) for r in run.split()["train"][:4]], "from training")
    with pytest.raises(ReleaseError, match="trained or validated on 4 golden image"):
        make_release(ws, run.id)


def test_serving_latest_switches_to_a_new_release_without_a_failed_request(lineage, tmp_path):
    """`core serve --release latest` under steady load while a release is made: every request answered 200, by the
    old release and then the new one, and /model names the new one."""
    import threading
    import time

    import requests
    from test_serve import _png, _start, _stop
    root = tmp_path / "ws"
    shutil.copytree(lineage["ws"].root, root)
    ws = Workspace(root)
    if not list_releases(ws):
        make_release(ws, lineage["sound"].id, gallery=False)
    before = list_releases(ws)[0]["name"]
    proc, url = _start(["--workspace", str(root), "serve", "--release", "latest", "--follow-interval", "0.3"], tmp_path)
    image = _png(np.full((32, 32, 3), 90, dtype=np.uint8))
    answers, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            r = requests.post(f"{url}/predict", files=[("files", ("a.png", image, "image/png"))], timeout=30)
            answers.append((r.status_code, r.json().get("release") if r.status_code == 200 else r.text))

    try:
        assert requests.get(f"{url}/model", timeout=5).json()["release"]["name"] == before
        threads = [threading.Thread(target=client) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        made = make_release(ws, lineage["again"].id, name="switched", force=True, reason="the switch test",
                            gallery=False)
        deadline = time.time() + 60
        while time.time() < deadline and requests.get(f"{url}/model", timeout=5).json()["release"]["name"] != "switched":
            time.sleep(0.2)
        time.sleep(1.0)  # load on the new one too
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        stop.set()
        _stop(proc)
    assert made["name"] == "switched"
    assert answers and all(code == 200 for code, _ in answers), [a for a in answers if a[0] != 200][:3]
    names = [name for _, name in answers]
    assert names[0] == before and names[-1] == "switched" and set(names) == {before, "switched"}


def test_the_runs_page_makes_the_golden_set_from_a_runs_test_part(decided_run, tmp_path, monkeypatch):

    from streamlit.testing.v1 import AppTest

    from conftest import ROOT
    ws0, run0 = decided_run[0], decided_run[1]
    root = tmp_path / "ws"
    shutil.copytree(ws0.root, root)
    monkeypatch.setenv("STUDIO_WORKSPACE", str(root))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    at.switch_page("pages/runs.py")
    at.run()
    at.multiselect(key="runs_selected").set_value([run0.id]).run()
    assert any("no golden set yet" in i.value for i in at.info)
    at.slider(key=f"golden_share_{run0.id}").set_value(1.0)
    at.button(key=f"golden_make_{run0.id}").click().run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    ws = Workspace(root)
    source = ws.run(run0.id).split()["source"]
    assert len(GoldenStore(ws).images(source)) == len(run0.split()["test"])
    assert ws.run_row(run0.id)["golden_acc"] is not None  # scored at once: the table shows it
    assert any(c.value.startswith(f"Golden set: {len(run0.split()['test'])} images") for c in at.caption)
