"""The hot folder: each image predicted once, after it is complete; nothing twice and nothing missed across a kill;
unreadable files logged and skipped; review images queued for the Label page."""
import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from core.data.images import ImageLoadError, load_array
from core.deploy.watch import HotFolder, review_queue


class FakePredictor:
    """Bright images are "dot"; mid-grey ones go to review: the watcher's bookkeeping without a model."""
    classes = ["blank", "dot"]

    def __init__(self):
        self.seen = []

    def predict(self, paths, top_k=1):
        out = []
        for p in paths:
            self.seen.append(os.path.basename(p))
            try:
                a = load_array(p, (8, 8))
            except ImageLoadError as exc:
                out.append({"path": p, "error": str(exc)})
                continue
            q = float(a.mean()) / 255
            verdict = "review" if 0.4 < q < 0.6 else ("fail" if q >= 0.6 else "pass")
            out.append({"path": p, "top": [{"label": "dot" if q >= 0.5 else "blank", "prob": max(q, 1 - q)}],
                        "probs": {"blank": 1 - q, "dot": q}, "decision": {"verdict": verdict}})
        return out


def _image(path, level):
    Image.fromarray(np.full((16, 16, 3), level, dtype=np.uint8)).save(path)


def _rows(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def hot(tmp_path, workspace):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    return workspace, inbox, tmp_path / "results.csv"


def test_each_image_once_after_it_settles_and_across_a_restart(hot):
    ws, inbox, out = hot
    fake = FakePredictor()
    now = [0.0]
    watcher = HotFolder(ws, inbox, fake, "test-model", out, settle_s=0.3, clock=lambda: now[0])
    _image(inbox / "a.png", 20)
    _image(inbox / "b.png", 240)
    assert watcher.process() == 0  # just seen: not yet known to be complete
    now[0] = 0.35
    assert watcher.process() == 2 and watcher.process() == 0
    _image(inbox / "c.png", 20)  # written while "the watcher is down"
    restarted = HotFolder(ws, inbox, fake, "test-model", out, settle_s=0.0)
    assert restarted.process() == 1
    assert fake.seen == ["a.png", "b.png", "c.png"]
    rows = _rows(out)
    assert [r["file"] for r in rows] == ["a.png", "b.png", "c.png"]
    assert [(r["class"], r["decision"]) for r in rows] == [("blank", "pass"), ("dot", "fail"), ("blank", "pass")]
    assert float(rows[1]["p_dot"]) == pytest.approx(240 / 255, abs=1e-5) and rows[0]["model"] == "test-model"


def test_a_file_still_being_written_waits_and_work_in_progress_names_are_never_read(hot):
    ws, inbox, out = hot
    fake, now = FakePredictor(), [0.0]
    watcher = HotFolder(ws, inbox, fake, "m", out, settle_s=1.0, clock=lambda: now[0])
    _image(inbox / "whole.png", 20)
    data = (inbox / "whole.png").read_bytes()
    growing = inbox / "growing.png"
    growing.write_bytes(data[: len(data) // 2])
    (inbox / "frame.png.part").write_bytes(data)
    (inbox / ".hidden.png").write_bytes(data)
    watcher.process()
    now[0] = 0.5
    with open(growing, "ab") as fh:  # the camera writes on, within the settle time
        fh.write(data[len(data) // 2:])
    watcher.process()
    now[0] = 1.2
    watcher.process()
    assert sorted(fake.seen) == ["whole.png"]  # growing.png changed 0.7 s ago: not yet
    now[0] = 1.6
    watcher.process()
    assert sorted(fake.seen) == ["growing.png", "whole.png"] and not _rows(out)[1]["error"]
    watcher.renamed.add(str(watcher.folder / "moved.png"))  # a rename into place: complete at once
    _image(inbox / "moved.png", 20)
    assert watcher.process() == 1


def test_an_unreadable_file_is_logged_skipped_and_not_retried(hot):
    ws, inbox, out = hot
    lines = []
    watcher = HotFolder(ws, inbox, FakePredictor(), "m", out, settle_s=0, log=lines.append)
    (inbox / "junk.png").write_bytes(b"not an image")
    assert watcher.process() == 1 and watcher.process() == 0
    row = _rows(out)[0]
    assert row["file"] == "junk.png" and row["class"] == "" and "not a recognised image" in row["error"]
    assert any(line.startswith("skipped junk.png: ") for line in lines)


def test_a_kill_between_the_record_and_the_csv_is_caught_up_once(hot, monkeypatch):
    ws, inbox, out = hot
    watcher = HotFolder(ws, inbox, FakePredictor(), "m", out, settle_s=0)
    _image(inbox / "a.png", 20)
    monkeypatch.setattr(HotFolder, "_append_csv", lambda self, row: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        watcher.process()
    monkeypatch.undo()
    assert _rows(out) == []
    fake = FakePredictor()
    HotFolder(ws, inbox, fake, "m", out, settle_s=0).process()
    HotFolder(ws, inbox, fake, "m", out, settle_s=0)  # a third start: nothing more to catch up
    assert [r["file"] for r in _rows(out)] == ["a.png"] and fake.seen == []


def test_a_csv_of_another_models_columns_is_refused(hot):
    ws, inbox, out = hot
    out.write_text("time,file,size,mtime_ns,model,class,decision,error,p_cat,p_dog\n")
    with pytest.raises(ValueError, match="holds rows for other columns .*give another --out"):
        HotFolder(ws, inbox, FakePredictor(), "m", out)


def test_review_images_are_linked_into_the_queue(hot):
    ws, inbox, out = hot
    HotFolder(ws, inbox, FakePredictor(), "m", out, settle_s=0)
    _image(inbox / "unsure.png", 128)
    _image(inbox / "sure.png", 10)
    HotFolder(ws, inbox, FakePredictor(), "m", out, settle_s=0).process()
    queue = review_queue(ws)
    assert [os.path.basename(q["path"]) for q in queue] == ["unsure.png"]
    assert os.path.realpath(queue[0]["link"]) == str((inbox / "unsure.png").resolve())
    assert queue[0]["probs"]["dot"] == pytest.approx(128 / 255, abs=1e-6)


def test_the_loop_wakes_on_file_events_and_stops(hot):
    ws, inbox, out = hot
    watcher = HotFolder(ws, inbox, FakePredictor(), "m", out, settle_s=0.1)
    stop = threading.Event()
    t = threading.Thread(target=watcher.run, kwargs={"interval_s": 30, "stop": stop})  # events, not the interval
    t.start()
    try:
        time.sleep(0.5)
        _image(inbox / "x.png", 20)
        deadline = time.time() + 10
        while time.time() < deadline and not _rows(out):
            time.sleep(0.1)
        assert [r["file"] for r in _rows(out)] == ["x.png"]
    finally:
        stop.set()
        _image(inbox / "wake.png", 20)  # an event wakes the loop to see the stop
        t.join(10)
    assert not t.is_alive()


@pytest.mark.slow
def test_core_watch_killed_and_restarted_predicts_nothing_twice_and_misses_nothing(decided_run, tmp_path):
    """The command with a run's model: SIGKILL while images arrive, more written while it is down, restarted."""
    ws, run, _, data = decided_run
    inbox, out = tmp_path / "inbox", tmp_path / "results.csv"
    inbox.mkdir()
    sources = sorted((data / "dot").glob("*.png"))[:6] + sorted((data / "blank").glob("*.png"))[:6]
    cmd = [sys.executable, "-m", "core", "--workspace", str(ws.root), "watch", run.id, str(inbox), "--out", str(out),
           "--interval", "0.2", "--settle", "0.2"]

    def wait_rows(n, proc):
        deadline = time.time() + 120
        while time.time() < deadline and len(_rows(out)) < n:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)
        return _rows(out)

    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        for src in sources[:4]:
            (inbox / src.name).write_bytes(src.read_bytes())
        wait_rows(4, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        for src in sources[4:]:  # written while nothing watches
            (inbox / src.name).write_bytes(src.read_bytes())
        (inbox / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
        proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        rows = wait_rows(len(sources) + 1, proc)
        time.sleep(1.0)  # a second look finds nothing new
        rows = _rows(out)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(15)
    names = [r["file"] for r in rows]
    assert sorted(names) == sorted([s.name for s in sources] + ["broken.png"]) and len(names) == len(set(names))
    good = [r for r in rows if not r["error"]]
    assert {r["class"] for r in good} <= {"blank", "dot"} and all(r["model"] == f"run {run.id}" for r in good)
    want = {s.name: s.parent.name for s in sources}
    assert sum(r["class"] == want[r["file"]] for r in good) >= len(good) // 2  # a real model's answers
    assert json.dumps(rows)  # plain text


def test_the_label_page_lists_the_lines_review_queue(hot, dot_folder, monkeypatch):
    from streamlit.testing.v1 import AppTest
    ws, inbox, out = hot
    ws.register_dataset("dots", str(dot_folder))
    _image(inbox / "unsure.png", 128)
    HotFolder(ws, inbox, FakePredictor(), "line-v1", out, settle_s=0).process()
    monkeypatch.setenv("STUDIO_WORKSPACE", str(ws.root))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    at.switch_page("pages/label.py")
    at.run()
    assert not at.exception, at.exception
    assert any(e.label == "Sent to review by the line (1)" for e in at.expander)
    assert any("unsure.png: dot 0.50, blank 0.50 (line-v1)" in c for c in at.get("image")[-1].captions) \
        if at.get("image") else False
