"""Every studio page through Streamlit's AppTest: empty workspace, a finished run, and training from the page."""
import json
import re
import shutil
import time

import pytest
from streamlit.testing.v1 import AppTest

from conftest import ROOT, write_class_folders, write_set_with_twins
from core.config import TrainConfig

PAGES = ["pages/home.py", "pages/datasets.py", "pages/train.py", "pages/evaluate.py", "pages/explore.py",
         "pages/predict.py", "pages/label.py", "pages/runs.py"]


def open_page(page: str | None = None) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    if page:
        at.switch_page(page)
        at.run()
    return at


def texts(at: AppTest) -> str:
    parts = [e.value for e in at.markdown] + [e.value for e in at.caption] + [e.value for e in at.info]
    parts += [e.value for e in at.warning] + [e.value for e in at.error] + [e.value for e in at.success]
    parts += [e.value for e in at.subheader] + [e.value for e in at.title]
    return "\n".join(str(p) for p in parts)


def train_page(epochs: int, image_size: int = 32, batch_size: int = 8) -> AppTest:
    """The Train page on the registered dataset "parts", from scratch, with these numbers set (not started)."""
    at = open_page("pages/train.py")
    # Picking a dataset applies its recipe to the fields, as a person sees it: then the numbers are typed.
    # (Set in the same run, the recipe came after them: a 2-epoch test job trained the auto recipe's 60.)
    at.selectbox(key="train_dataset").set_value("parts").run()
    at.selectbox(key="cfg_weights").set_value("none")
    at.number_input(key="cfg_epochs").set_value(epochs)
    at.number_input(key="cfg_image_size").set_value(image_size)
    at.number_input(key="cfg_batch_size").set_value(batch_size).run()
    return at


@pytest.fixture
def empty_ws(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_WORKSPACE", str(tmp_path / "ws"))
    return tmp_path / "ws"


@pytest.fixture
def finished_ws(tmp_path, monkeypatch, trained):
    root = tmp_path / "ws"
    shutil.copytree(trained["ws"].root, root)
    monkeypatch.setenv("STUDIO_WORKSPACE", str(root))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_on_an_empty_workspace(empty_ws, page):
    at = open_page(page)
    assert not at.exception, at.exception
    assert at.title[0].value


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_with_a_finished_run(finished_ws, page):
    at = open_page(page)
    assert not at.exception, at.exception


def test_the_example_dataset_is_ready_at_the_first_start_unless_turned_off(empty_ws, monkeypatch, tmp_path):
    pytest.importorskip("elpv_dataset")
    from core.workspace.store import Workspace
    from pages import _ui
    monkeypatch.setenv("STUDIO_EXAMPLE", "1")  # the default; the suite runs with 0
    _ui._manager.clear()
    at = open_page("pages/datasets.py")
    assert [d["source"] for d in Workspace(empty_ws).list_datasets()] == ["elpv"]
    assert any(_ui.ELPV_NAME in str(s.options) for s in at.selectbox)
    monkeypatch.setenv("STUDIO_EXAMPLE", "0")
    monkeypatch.setenv("STUDIO_WORKSPACE", str(tmp_path / "team"))
    _ui._manager.clear()
    at = open_page("pages/datasets.py")
    assert Workspace(tmp_path / "team").list_datasets() == [] and "No dataset yet" in texts(at)
    _ui._manager.clear()


@pytest.mark.slow
def test_evaluate_page_shows_metrics_matrix_and_gallery_filter(finished_ws, trained):
    at = open_page("pages/evaluate.py")
    ev = trained["run"].evaluation()
    labels = [m.label for m in at.metric]
    assert "Test accuracy" in labels
    assert at.metric[0].value == f"{ev['accuracy']:.1%}"
    at.selectbox(key="cell_true").set_value("dot")
    at.selectbox(key="cell_pred").set_value("dot").run()
    assert not at.exception
    assert "Correct: dot" in texts(at)
    at.toggle(key="show_near").set_value(True).run()  # each image with its nearest training images
    assert not at.exception, at.exception
    near = [c.value for c in at.caption if re.fullmatch(r"(dot|blank) · -?\d\.\d\d", c.value)]
    shown = min(12, sum(1 for c in at.caption if c.value.endswith(".png")))
    assert len(near) == 3 * shown > 0


def test_evaluate_page_shows_grade_error_and_grade_costs_for_ordered_classes(tmp_path, monkeypatch):
    from conftest import tiny_config, write_graded_folders
    from core.runs.life import prepare_run
    from core.train.loop import fit
    from core.workspace.store import Workspace
    ws = Workspace(tmp_path / "ws")
    run = prepare_run(ws, tiny_config(write_graded_folders(tmp_path / "graded"), epochs=1, ordinal=True,
                                      val_fraction=0.25, test_fraction=0.25))
    assert fit(ws, run)["status"] == "done"
    monkeypatch.setenv("STUDIO_WORKSPACE", str(ws.root))
    at = open_page("pages/evaluate.py")
    assert not at.exception, at.exception
    grade = next(m for m in at.metric if m.label == "Mean grade error")
    assert grade.value == f"{run.evaluation()['grade_mae']:.3f}"
    assert "a mistake costs the grades it is off by" in texts(at)  # the decision rule's default costs


@pytest.mark.slow
def test_evaluate_page_calibrates_decides_and_saves_a_rule(finished_ws, trained):
    from core.decide.stored import load_rule, save_rule
    from core.infer.evaluate import evaluate_run, read_predictions
    from core.workspace.store import Workspace
    ws = Workspace(finished_ws)
    run = ws.run(trained["run"].id)
    evaluate_run(ws, run)  # this copy's own calibration and scores
    at = open_page("pages/evaluate.py")
    assert not at.exception, at.exception
    temperature = next(m for m in at.metric if m.label == "Temperature")
    assert temperature.value == f"{run.temperature():.2f}"
    at.selectbox(key="decide_positive").set_value("dot")
    at.number_input(key="decide_cost_miss").set_value(10.0)
    at.radio(key="decide_band_mode").set_value("reach a target accuracy").run()
    assert not at.exception, at.exception
    assert "Threshold" in texts(at) and "Review band" in texts(at)
    assert load_rule(run) is None  # nothing saved until asked
    at.button(key="decide_save").click().run()
    assert not at.exception, at.exception
    rule = load_rule(run)
    assert rule.positive == "dot" and rule.inputs["cost_miss"] == 10 and rule.target_accuracy == 0.95
    assert {r["decision"] for r in read_predictions(run)} <= {"pass", "fail", "review"}
    # the Predict page's caption names the rule; the label queue pulls what a band sends to a person
    ws.register_dataset("dots", run.split()["source"])
    rule.band_low, rule.band_high = 0.0, 1.0  # every image is reviewed
    save_rule(run, rule)
    label = open_page("pages/label.py")
    label.radio(key="queue_kind").set_value("Review band").run()
    assert not label.exception, label.exception
    n = len(run.split()["train"]) + len(run.split()["val"]) + len(run.split()["test"])
    assert f"{n} images the model's decision rule sends to a person" in texts(label)
    label.radio(key="queue_kind").set_value("Outliers").run()  # the images far from every class centre
    assert not label.exception, label.exception
    from core.explain.features import outliers
    far = sum(o["far"] for o in outliers(ws, run))
    assert f"\n{far} images farther from every class centre" in "\n" + texts(label)
    at.button(key="decide_clear").click().run()
    assert load_rule(run) is None and {r["decision"] for r in read_predictions(run)} == {""}
    # how many more images: a learning-curve job started from the page, its advice shown when done
    at.number_input(key="lc_epochs").set_value(1)
    at.button(key="lc_start").click().run()
    assert not at.exception, at.exception
    lc_id = at.session_state["train_run"]
    from pages import _ui
    assert _ui._manager(str(finished_ws.resolve())).wait(lc_id, timeout=300).status == "done"
    at.run()
    assert f"From learning-curve run {lc_id}" in texts(at)
    assert "more images of dot" in texts(at) or "dot: " in texts(at)


def test_datasets_page_registers_a_folder(empty_ws, tmp_path):
    at = open_page("pages/datasets.py")  # an empty workspace opens "Add a dataset" expanded
    assert [e.proto.expanded for e in at.expander if e.label == "Add a dataset"] == [True]
    data = write_class_folders(tmp_path / "parts", per_class=6, size=16)
    (data / "dot" / "broken.png").write_bytes(b"junk")
    at = open_page("pages/datasets.py")
    at.text_input[0].set_value(str(data))
    at.button[0].click().run()  # the form's Register button
    assert not at.exception, at.exception
    assert "Registered parts: 12 images in 2 classes" in texts(at)
    assert at.metric[0].value == "12" and at.metric[2].value == "1"  # images, skipped
    table = next(d.value for d in at.dataframe if "kind" in d.value.columns)  # every skipped file, named
    assert table.to_dict("records") == [{"path": str(data / "dot" / "broken.png"), "kind": "not an image",
                                         "reason": "not a recognised image file (or a format that is not allowed)"}]


def test_datasets_page_lists_near_duplicates_and_those_the_split_separates(empty_ws, tmp_path):
    root, planted = write_set_with_twins(tmp_path / "twins")
    at = open_page("pages/datasets.py")
    at.text_input[0].set_value(str(root))
    at.button[0].click().run()
    assert not at.exception, at.exception
    warning = next(w.value for w in at.warning if "near-duplicate" in w.value)
    assert warning.startswith(f"{len(planted)} groups of near-duplicate images ({2 * len(planted)} images)")
    table = next(d.value for d in at.dataframe if "files" in d.value.columns)
    assert {frozenset(f.split(" | ")) for f in table["files"]} == {frozenset(p) for p in planted}
    leaking = int(warning.split("; ")[1].split(" of them")[0])
    assert leaking == sum("," in p for p in table["parts"]) > 0
    at.slider(key="dup_distance").set_value(0).run()  # only exact look-alikes: the JPEG re-saves drop out
    table0 = next(d.value for d in at.dataframe if "files" in d.value.columns)
    assert 0 < len(table0) < len(planted)


@pytest.mark.slow
def test_train_page_starts_a_job_that_reaches_done(empty_ws, tmp_path):
    from core.workspace.store import Workspace
    data = write_class_folders(tmp_path / "parts", per_class=20, size=32)
    Workspace(empty_ws).register_dataset("parts", str(data))
    at = train_page(epochs=2)
    at.button[0].click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    run_id = at.session_state["train_run"]
    ws = Workspace(empty_ws)
    deadline = time.time() + 300  # a loaded 2-core machine: the job process starts slowly
    seen_progress = False
    while time.time() < deadline:
        at.run()
        assert not at.exception
        if at.get("progress"):
            seen_progress = True
        if ws.run_row(run_id)["status"] in ("done", "failed"):
            break
        time.sleep(0.5)
    at.run()
    assert seen_progress
    assert ws.run_row(run_id)["status"] == "done", ws.run_row(run_id)["error"]
    assert f"Run {run_id}" in texts(at) and "done" in texts(at)
    # The process wrote "done"; the job's thread may still be finishing. Waited for, or it writes to a workspace
    # pytest has already removed, and its traceback lands in a later test (seen: it broke a page's parse there).
    from pages import _ui
    assert _ui._manager(str(empty_ws.resolve())).wait(run_id, timeout=60).status == "done"


@pytest.mark.slow
def test_second_start_while_training_is_refused(empty_ws, tmp_path):
    from core.workspace.store import Workspace
    data = write_class_folders(tmp_path / "parts", per_class=20, size=32)
    Workspace(empty_ws).register_dataset("parts", str(data))

    def start(epochs):
        at = train_page(epochs)
        at.button[0].click().run()
        return at

    first = start(300)  # one tab starts a long job
    run_id = first.session_state["train_run"]
    second = start(2)   # another tab presses Start while it runs
    assert any("one job trains at a time" in w.value for w in second.warning)
    ws = Workspace(empty_ws)
    assert [r["id"] for r in ws.list_runs()] == [run_id]
    from pages import _ui
    jm = _ui._manager(str(empty_ws.resolve()))
    jm.stop(run_id)
    # Waits for the job's thread to finish its bookkeeping too (it returns as soon as it has): a thread still writing
    # when the test's workspace is removed fails in the background.
    assert jm.wait(run_id, timeout=300).status in ("stopped", "done")


def test_gallery_relabel_and_label_page_history(finished_ws, trained):
    """Relabel one image from the evaluation gallery; the Label page shows it in the history and undoes it."""
    from core.data.labels import LabelStore
    from core.workspace.store import Workspace
    at = open_page("pages/evaluate.py")
    at.selectbox(key="cell_true").set_value("dot")
    at.selectbox(key="cell_pred").set_value("dot").run()
    fix = next(b for b in at.button if b.key and b.key.startswith("fix_0_blank"))
    fix.click().run()
    assert not at.exception, at.exception
    ws = Workspace(finished_ws)
    source = trained["run"].split()["source"]
    history = LabelStore(ws).history(source)
    assert len(history) == 1 and history[0]["old_label"] == "dot" and history[0]["new_label"] == "blank"
    ws.register_dataset("dots", source)
    label = open_page("pages/label.py")
    assert not label.exception, label.exception
    assert any(m.label == "Changed labels" and m.value == "1" for m in label.metric)
    label.button(key="undo").click().run()
    assert not label.exception
    assert history[0]["path"] not in LabelStore(ws).overrides(source)  # back to its folder label: no override


AUTH = {"redirect_uri": "http://localhost:8501/oauth2callback", "cookie_secret": "x" * 32,
        "client_id": "studio", "client_secret": "s", "server_metadata_url": "https://login.example/.well-known"}


def signed_in_page(page: str | None, user: dict | None) -> AppTest:
    """A page of a studio with login configured. (AppTest's switch_page runs the page alone, without app.py around
    it: the gate and the sidebar are checked on the first run, which goes through app.py as every real one does.)"""
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.secrets["auth"] = AUTH
    at.user = user or {"is_logged_in": False}
    at.run()
    assert not at.exception, at.exception
    if page:
        at.switch_page(page).run()
    assert not at.exception, at.exception
    return at


def test_a_shared_studio_asks_for_sign_in_and_undo_is_per_person(finished_ws, trained):
    from core.data.labels import LabelStore
    from core.workspace.store import Workspace
    visitor = signed_in_page(None, None)
    assert "sign in" in texts(visitor).lower() and [b.label for b in visitor.button] == ["Sign in"]
    assert not visitor.sidebar.caption  # nothing of the studio before signing in, not even the sidebar
    home = signed_in_page(None, {"is_logged_in": True, "email": "ana@plant.example"})
    assert "Signed in as ana@plant.example" in texts(home) and "Sign out" in [b.label for b in home.button]
    ana = signed_in_page("pages/evaluate.py", {"is_logged_in": True, "email": "ana@plant.example"})
    ana.selectbox(key="cell_true").set_value("dot")
    ana.selectbox(key="cell_pred").set_value("dot").run()
    next(b for b in ana.button if b.key and b.key.startswith("fix_0_blank")).click().run()
    ws = Workspace(finished_ws)
    source = trained["run"].split()["source"]
    change = LabelStore(ws).history(source)[0]
    assert change["actor"] == "ana@plant.example" and change["new_label"] == "blank"
    ws.register_dataset("dots", source)
    ben = signed_in_page("pages/label.py", {"is_logged_in": True, "email": "ben@plant.example"})
    ben.button(key="undo").click().run()
    assert LabelStore(ws).overrides(source)[change["path"]][0] == "blank"  # Ben cannot undo Ana's change
    ana = signed_in_page("pages/label.py", {"is_logged_in": True, "email": "ana@plant.example"})
    ana.button(key="undo").click().run()
    assert change["path"] not in LabelStore(ws).overrides(source)  # hers: back to no override at all


def test_a_shared_studio_registers_folders_only_under_its_data_roots(empty_ws, tmp_path, monkeypatch):
    from core.workspace.store import Workspace
    allowed = write_class_folders(tmp_path / "roots" / "parts", per_class=3, size=16)
    secret = write_class_folders(tmp_path / "home" / "private", per_class=3, size=16)
    (tmp_path / "roots" / "sneaky").symlink_to(secret)
    monkeypatch.setenv("STUDIO_DATA_ROOTS", str(tmp_path / "roots"))
    at = open_page("pages/datasets.py")
    for path in (secret, tmp_path / "roots" / "sneaky", tmp_path / "roots" / ".." / "home" / "private"):
        at.text_input[0].set_value(str(path))
        at.button[0].click().run()
        assert "outside the folders this studio may read" in texts(at), path
    assert Workspace(empty_ws).list_datasets() == []
    at.text_input[0].set_value(str(allowed))
    at.button[0].click().run()
    assert [d["source"] for d in Workspace(empty_ws).list_datasets()] == [str(allowed)]


@pytest.mark.slow
def test_train_settings_survive_a_visit_to_another_page(empty_ws, tmp_path):
    """Bug: the Train page forgot the recipe and every setting after a visit to another page."""
    from core.workspace.store import Workspace
    data = write_class_folders(tmp_path / "parts", per_class=6, size=16)
    Workspace(empty_ws).register_dataset("parts", str(data))
    at = open_page("pages/train.py")
    at.selectbox(key="preset").set_value("quick look (CPU)").run()
    at.number_input(key="cfg_epochs").set_value(7)
    at.number_input(key="cfg_lr").set_value(0.0005)
    at.checkbox(key="cfg_vflip").check().run()
    assert not at.exception, at.exception
    at.switch_page("pages/datasets.py").run()
    assert not at.exception and at.title[0].value == "Datasets"
    at.switch_page("pages/train.py").run()
    assert not at.exception, at.exception
    assert at.selectbox(key="preset").value == "quick look (CPU)"
    assert at.number_input(key="cfg_epochs").value == 7
    assert at.number_input(key="cfg_lr").value == 0.0005
    assert at.number_input(key="cfg_image_size").value == 128  # from the recipe
    assert at.checkbox(key="cfg_vflip").value is True


@pytest.mark.slow
def test_picking_a_dataset_offers_its_last_config(empty_ws, tmp_path):
    from core.runs.life import prepare_run
    from core.workspace.store import Workspace
    ws = Workspace(empty_ws)
    first = write_class_folders(tmp_path / "first", per_class=6, size=16)
    second = write_class_folders(tmp_path / "second", per_class=6, size=16)
    ws.register_dataset("second", str(second))
    ws.register_dataset("first", str(first))
    prepare_run(ws, TrainConfig(data=str(second), weights="none", epochs=3, image_size=48, batch_size=4,
                                optimizer="sgd", extra={"preset": "quick look (CPU)"}))
    at = open_page("pages/train.py")
    at.selectbox(key="train_dataset").set_value("first").run()
    # Never trained: the auto recipe's settings for it, said with its estimate and reasons.
    assert at.selectbox(key="preset").value == "auto"
    assert at.number_input(key="cfg_image_size").value == 64 and at.selectbox(key="cfg_weights").value == "none"
    assert any(i.value.startswith("**Auto**: about") and "Why: 64 px" in i.value for i in at.info)
    at.selectbox(key="train_dataset").set_value("second").run()
    assert not at.exception, at.exception
    assert at.number_input(key="cfg_epochs").value == 3
    assert at.number_input(key="cfg_image_size").value == 48
    assert at.selectbox(key="cfg_optimizer").value == "sgd"
    assert at.selectbox(key="preset").value == "quick look (CPU)"


def test_curves_have_whole_epoch_ticks_and_a_fraction_axis():
    """Seen in the browser: an empty 0-400% accuracy axis before the first epoch, and ticks at epoch 1.5, 2.5."""
    from pages import _ui
    empty = _ui.curves_figure([], "acc", "Accuracy")
    assert tuple(empty.layout.yaxis.range) == (0, 1.02) and empty.layout.yaxis.tickformat == ".0%"
    assert empty.layout.annotations[0].text == "waiting for the first epoch to finish"
    rows = [{"epoch": e, "train_acc": 0.5, "val_acc": 0.6, "train_loss": 1.0, "val_loss": 1.1} for e in (1, 2, 3)]
    fig = _ui.curves_figure(rows, "acc", "Accuracy")
    assert (fig.layout.xaxis.tick0, fig.layout.xaxis.dtick) == (1, 1) and not fig.layout.annotations
    long = _ui.curves_figure([{**rows[0], "epoch": e} for e in range(1, 61)], "loss", "Loss")
    assert long.layout.xaxis.dtick == 6 and long.layout.yaxis.rangemode == "tozero"


def test_curves_shade_the_epochs_trained_below_the_run_size():
    """Progressive resizing's first epochs validate at a size they have not trained at, and read low (ELPV: 31%
    after epoch 2): the chart says so over exactly those epochs, and only there."""
    from pages import _ui
    rows = [{"epoch": e, "train_acc": 0.5, "val_acc": 0.6, "train_size": s} for e, s in ((1, 32), (2, 48), (3, 64))]
    fig = _ui.curves_figure(rows, "acc", "Accuracy", full_size=64)
    (shade,) = fig.layout.shapes
    assert (shade.x0, shade.x1) == (0.5, 2.5)
    assert "validation at 64 px reads low" in fig.layout.annotations[0].text
    for plain in (_ui.curves_figure(rows, "acc", "Accuracy"),  # size unknown
                  _ui.curves_figure([{**r, "train_size": 64} for r in rows], "acc", "Accuracy", full_size=64),
                  _ui.curves_figure([{k: v for k, v in r.items() if k != "train_size"} for r in rows], "acc", "A",
                                    full_size=64)):  # a run from before the column
        assert not plain.layout.shapes and not plain.layout.annotations


def test_curves_of_a_run_whose_config_cannot_be_read_shade_nothing(tmp_path):
    from conftest import tiny_config
    from core.workspace.store import Workspace
    from pages import _ui
    run = Workspace(tmp_path / "ws").create_run(tiny_config("x", image_size=64), "x")
    run.write_config(tiny_config("x", image_size=64))
    assert _ui.image_side(run) == 64
    run.config_path.write_text("{not json")
    assert _ui.image_side(run) == 0
    run.config_path.unlink()
    assert _ui.image_side(run) == 0


def test_history_keeps_the_size_each_epoch_trained_at(tmp_path):
    from conftest import tiny_config
    from core.workspace.store import Workspace
    ws = Workspace(tmp_path / "ws")
    run = ws.create_run(tiny_config("x"), "x")
    run.write_history([{"epoch": 1, "train_loss": 1.0, "train_size": 32}, {"epoch": 2, "train_loss": 0.9}])
    assert [r.get("train_size") for r in run.history()] == [32, None]


def test_runs_page_exports_a_model(finished_ws, trained):
    from pathlib import Path
    rid = trained["run"].id
    at = open_page("pages/runs.py")
    at.radio(key=f"export_fmt_{rid}").set_value("torchscript")
    at.button(key=f"export_{rid}").click().run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    path = Path(at.session_state[f"exported_{rid}"])
    assert path.suffix == ".pt" and path.exists() and path.with_name(path.name + ".card.json").exists()
    assert path.is_relative_to(finished_ws)
    at.button(key=f"audit_pack_{rid}").click().run()  # the audit pack: the report and the zip to download
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    pack = at.session_state[f"audit_pack_{rid}_out"]
    assert Path(pack["zip"]).exists() and Path(pack["html"]).is_relative_to(finished_ws)
    assert "files/evaluation.json" in pack["files"]


@pytest.mark.slow
def test_train_page_estimates_the_time_before_start(empty_ws, tmp_path):
    from core.workspace.store import Workspace
    data = write_class_folders(tmp_path / "parts", per_class=10, size=16)
    Workspace(empty_ws).register_dataset("parts", str(data))
    at = train_page(epochs=10, batch_size=4)
    next(b for b in at.button if b.label == "Estimate the time").click().run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    assert any(i.value.startswith("Estimated time: about ") for i in at.info)
    at.number_input(key="cfg_epochs").set_value(20).run()  # other settings: the old estimate is not shown
    assert not any(i.value.startswith("Estimated time") for i in at.info)
    assert any("you changed" in i.value and "epochs" in i.value for i in at.info)  # nor auto's estimate
    at.selectbox(key="preset").set_value("classic").run()  # the classic recipe, one click away
    assert (at.number_input(key="cfg_image_size").value, at.number_input(key="cfg_epochs").value) == (224, 10)
    assert not any("**Auto**" in i.value for i in at.info)
    at.selectbox(key="preset").set_value("auto").run()
    assert any(i.value.startswith("**Auto**: about") for i in at.info)
    assert Workspace(empty_ws).list_runs() == []


def test_evaluate_page_runs_the_gradcam_audit_in_the_background(finished_ws, trained):
    from core.explain.cam_audit import load_cam_audit, saved_region
    from core.workspace.store import Workspace
    from pages import _audit
    ws = Workspace(finished_ws)
    run = ws.run(trained["run"].id)
    at = open_page("pages/evaluate.py")
    assert not at.exception, at.exception
    assert "Where the model looks" in [s.value for s in at.subheader]
    at.radio(key="audit_region_kind").set_value(_audit.REGION_KINDS[1]).run()
    at.slider(key="audit_x").set_value((20, 80)).run()
    at.button(key="audit_start").click().run()
    assert not at.exception, at.exception
    assert saved_region(ws, run.config().data).box[0] == pytest.approx(0.2)  # kept for the dataset
    from pages import _ui
    jobs = _audit.audits(_ui._manager(str(finished_ws.resolve())).ws)  # the page's own, shared in this process
    deadline = time.time() + 120
    while jobs.status(run.id)["status"] == "running" and time.time() < deadline:
        time.sleep(0.2)
    assert jobs.status(run.id)["status"] == "done", jobs.status(run.id)
    at.run()
    assert not at.exception, at.exception
    result = load_cam_audit(run)
    assert result["region"]["box"][0] == pytest.approx(0.2)
    assert f"Last audit: {result['n']} test images" in texts(at)
    assert any("images where the model looked mostly outside the region" in m.value for m in at.markdown)


@pytest.mark.slow
def test_train_page_offers_self_supervised_pretraining_with_its_settings(empty_ws, tmp_path):
    from core.workspace.store import Workspace
    data = write_class_folders(tmp_path / "parts", per_class=10, size=16)
    Workspace(empty_ws).register_dataset("parts", str(data))
    at = train_page(epochs=2, batch_size=4)
    assert not any(n.key == "cfg_ssl_epochs" for n in at.number_input)  # shown only when asked for
    at.selectbox(key="cfg_weights").set_value("self-supervised").run()
    assert any(c.value.startswith("Worth it when nearly all of your images have no label yet") for c in at.caption)
    at.number_input(key="cfg_ssl_epochs").set_value(3)
    at.number_input(key="cfg_ssl_image_size").set_value(32).run()
    next(b for b in at.button if b.label == "Estimate the time").click().run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    assert any(i.value.startswith("Estimated time: about ") for i in at.info)
    assert at.session_state["estimate"][0]["weights"] == "self-supervised"
    assert at.session_state["estimate"][0]["ssl_epochs"] == 3


def test_label_page_queues_what_cleanlab_flags_and_shows_the_noise_estimate(empty_ws, tmp_path):
    """A cross-validation's report (written as the job writes it, from out-of-sample probabilities planted here:
    every fourth dot looks like a blank) becomes the "Likely label errors" queue, with the noise estimate."""
    import numpy as np

    from core.data.sources import load_dataset
    from core.studies.curation import write_label_report
    from core.workspace.store import Workspace
    data = write_class_folders(tmp_path / "parts", per_class=20, size=16)
    ws = Workspace(empty_ws)
    ws.register_dataset("parts", str(data))
    ds = load_dataset(str(data))
    run = ws.create_run(TrainConfig(data=str(data), weights="none"), "parts")
    rows = [[s.path, ds.classes[s.label], ""] for s in ds.samples]
    run.split_path.write_text(json.dumps({"source": ds.source, "classes": ds.classes, "train": rows, "val": [],
                                          "test": []}))
    dots = [i for i, r in enumerate(rows) if r[1] == "dot"]
    looks_blank = set(dots[::4])
    probs = np.array([[0.97, 0.03] if (r[1] == "blank" or i in looks_blank) else [0.03, 0.97]
                      for i, r in enumerate(rows)])
    write_label_report(run, rows, ds.classes, probs, 5, ds.source)
    at = open_page("pages/label.py")
    at.radio(key="queue_kind").set_value("Likely label errors").run()
    assert not at.exception, at.exception
    shown = texts(at)
    assert f"{len(looks_blank)} images that cleanlab flags" in shown
    assert "Estimated label noise" in shown and "of the images labelled dot look like blank" in shown
    assert len(at.get("plotly_chart")) == 2  # the out-of-fold confusion matrix and the estimated flips
