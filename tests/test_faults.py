"""Bad inputs, faults and hostile files: a clear message, nothing lost, nothing written outside the workspace.
The table of cases is in tests/README.md."""
import errno
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, make_dot_image, tiny_config, write_class_folders
from core.data.duplicates import dataset_duplicate_groups
from core.data.images import ImageLoadError, open_image
from core.data.sources import DatasetError, load_dataset
from core.data.zips import ImportError_, import_zip
from core.jobs.queue import JobManager
from core.models.checkpoint import CheckpointError, load_checkpoint, safe_torch_load
from core.models.resnet import model_from_checkpoint
from core.runs.life import TrainingError, prepare_run
from core.train.loop import fit

# ---------------------------------------------------------------------------------------------- images

def test_multipage_tiff_uses_first_page(tmp_path):
    pages = [Image.new("RGB", (8, 8), c) for c in [(0, 255, 0), (255, 0, 0)]]
    pages[0].save(tmp_path / "m.tif", save_all=True, append_images=pages[1:])
    assert np.asarray(open_image(tmp_path / "m.tif"))[0, 0].tolist() == [0, 255, 0]


def test_formats_outside_the_allowed_list_are_refused(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "icon.png", format="ICO")  # a real image, not a user format
    with pytest.raises(ImageLoadError, match="not a recognised image"):
        open_image(tmp_path / "icon.png")


def test_exif_rotated_photo_is_upright_in_prediction_and_overlay(trained, tmp_path):
    from core.deploy.predict import Predictor
    size = trained["size"]
    rng = np.random.default_rng(4)
    img, _ = make_dot_image(rng, size, dot=True)
    wide = Image.fromarray(np.concatenate([img, img * 0], axis=1))  # size x 2size, dot image on the left
    exif = Image.Exif()
    exif[0x0112] = 8  # displayed rotated 90 degrees counter-clockwise
    wide.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    pred = Predictor(trained["run"].best_path)
    out = pred.explain(str(tmp_path / "phone.jpg"))
    upright = np.asarray(open_image(tmp_path / "phone.jpg").resize((size, size)))
    assert open_image(tmp_path / "phone.jpg").size == (size, 2 * size)  # portrait, as the phone showed it
    assert np.abs(out["rgb"].astype(int) - upright.astype(int)).mean() < 3
    assert out["overlay"].shape == (size, size, 3)


# -------------------------------------------------------------------------------------------- datasets

def test_unreadable_folder(tmp_path, monkeypatch):
    write_class_folders(tmp_path / "d", per_class=3, size=16)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == str(tmp_path / "d") else real(p, m))
    with pytest.raises(DatasetError, match="permission denied"):
        load_dataset(str(tmp_path / "d"))


def test_images_under_a_single_wrapper_folder(tmp_path):
    write_class_folders(tmp_path / "export" / "data", per_class=3, size=16)
    ds = load_dataset(str(tmp_path / "export"))
    assert ds.classes == ["blank", "dot"] and len(ds.samples) == 6


def test_odd_file_names_train_end_to_end(tmp_path, workspace):
    root = tmp_path / "odd names"
    write_class_folders(root, per_class=12, size=32, classes=("café crème", "dot dot"))
    raw = os.fsencode(str(root / "dot dot")) + b"/caf\xe9-latin1.png"  # not valid UTF-8
    Image.fromarray(make_dot_image(np.random.default_rng(0), 32, True)[0]).save(os.fsdecode(raw))
    ds = load_dataset(str(root))
    assert len(ds.samples) == 25
    run = prepare_run(workspace, tiny_config(root, epochs=1, batch_size=8))
    result = fit(workspace, run)
    assert result["status"] == "done" and run.predictions_path.exists()


def test_symlink_loop_does_not_hang(tmp_path):
    root = write_class_folders(tmp_path / "d", per_class=3, size=16)
    os.symlink(root / "dot", root / "dot" / "loop")
    ds = load_dataset(str(root))
    assert len(ds.samples) == 6


def test_duplicate_files_are_found(tmp_path):
    root = write_class_folders(tmp_path / "d", per_class=3, size=16)
    src = sorted((root / "dot").iterdir())[0]
    (root / "blank" / "copy.png").write_bytes(src.read_bytes())
    ds = load_dataset(str(root))
    groups = dataset_duplicate_groups(ds, 0)  # a copy filed under another class: one group, labels disagree
    assert len(groups) == 1
    assert sorted(os.path.basename(ds.samples[i].path) for i in groups[0]) == sorted(["copy.png", src.name])


# ---------------------------------------------------------------------------------------------- zips

def _png_bytes(color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="PNG")
    return buf.getvalue()


def _zip(entries) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for item in entries:
            if isinstance(item, zipfile.ZipInfo):
                zf.writestr(item, b"payload")
            else:
                name, data = item
                zf.writestr(name, data)
    return buf.getvalue()


def _good_entries():
    return [(f"set/{c}/{i}.png", _png_bytes()) for c in ("ok", "nok") for i in range(3)]


def _files_outside(root, before):
    return {p for p in root.rglob("*")} - before


def test_zip_import_skips_unsafe_entries_and_writes_nothing_outside(tmp_path):
    ws_root = tmp_path / "ws"
    target = ws_root / "datasets"
    link = zipfile.ZipInfo("set/ok/link.png")
    link.external_attr = (0o120777 << 16)
    data = _zip(_good_entries() + [("../evil.png", _png_bytes()), ("/abs/evil.png", _png_bytes()),
                                   ("C:/win/evil.png", _png_bytes()), ("set/..\\..\\evil2.png", _png_bytes()),
                                   ("set/ok/inner.zip", _zip(_good_entries())), ("set/notes.txt", b"hi"),
                                   ("__MACOSX/set/._x.png", b"junk"), link])
    result = import_zip(io.BytesIO(data), target, name="parts")
    reasons = dict(result.skipped)
    assert result.files == 6 and result.path == target / "parts"
    assert "unsafe path" in reasons["../evil.png"] and "unsafe path" in reasons["/abs/evil.png"]
    assert "unsafe path" in reasons["C:/win/evil.png"] and "unsafe path" in reasons["set/..\\..\\evil2.png"]
    assert "symbolic link" in reasons["set/ok/link.png"] and "nested zip" in reasons["set/ok/inner.zip"]
    assert not list(tmp_path.rglob("evil*"))
    assert load_dataset(str(result.path)).classes == ["nok", "ok"]


@pytest.mark.parametrize("make,message", [
    (lambda: _zip(_good_entries())[:200], "truncated or corrupt"),
    (lambda: b"this is not a zip at all", "not a zip"),
    (lambda: _zip([("a.txt", b"x")]), "no image files"),
])
def test_broken_zips_are_refused_and_leave_nothing(tmp_path, make, message):
    target = tmp_path / "datasets"
    with pytest.raises(ImportError_, match=message):
        import_zip(io.BytesIO(make()), target, name="x")
    assert list(target.iterdir()) == []


def test_encrypted_zip_refused(tmp_path):
    # zipfile cannot write encrypted zips: set the "encrypted" flag bit in the local and central headers.
    data = bytearray(_zip([("set/a/1.png", _png_bytes()), ("set/b/1.png", _png_bytes())]))
    for signature, flag_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = 0
        while (at := data.find(signature, start)) >= 0:
            data[at + flag_offset] |= 0x1
            start = at + 4
    data = bytes(data)
    with pytest.raises(ImportError_, match="encrypted"):
        import_zip(io.BytesIO(data), tmp_path / "datasets", name="x")
    assert list((tmp_path / "datasets").iterdir()) == []


def test_zip_bomb_caught_while_streaming(tmp_path):
    # 50 MB of zeros named .png compresses to ~50 KB: refused by the ratio cap while extracting,
    # and a limit on the total is counted on what is actually extracted, not on declared sizes.
    data = _zip([("set/a/bomb.png", b"\0" * (50 * 2**20)), ("set/b/1.png", _png_bytes())])
    with pytest.raises(ImportError_, match="zip bomb"):
        import_zip(io.BytesIO(data), tmp_path / "datasets", name="x")
    with pytest.raises(ImportError_, match="total limit"):
        import_zip(io.BytesIO(_zip(_good_entries())), tmp_path / "datasets", name="y", max_total=200)
    with pytest.raises(ImportError_, match="entries"):
        import_zip(io.BytesIO(_zip(_good_entries())), tmp_path / "datasets", name="z", max_entries=3)
    assert list((tmp_path / "datasets").iterdir()) == []


# --------------------------------------------------------------------------------------- checkpoints

class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_code_running_pickle_is_refused_and_never_runs(tmp_path):
    sentinel = tmp_path / "pwned"
    torch.save({"model": _Evil(str(sentinel))}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="could run code"):
        safe_torch_load(tmp_path / "evil.pt")
    assert not sentinel.exists()


@pytest.mark.parametrize("writer,message", [
    (lambda p: torch.save(torch.nn.Linear(2, 2), p), "could run code"),
    (lambda p: p.write_bytes(os.urandom(4096)), "not a|corrupt|cannot read"),
    (lambda p: p.write_bytes(b""), "truncated|corrupt|not a|cannot read"),
])
def test_unusable_checkpoint_files_have_specific_messages(tmp_path, writer, message):
    path = tmp_path / "x.pt"
    writer(path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_truncated_and_mismatched_checkpoints(trained, tmp_path):
    best = trained["run"].best_path
    cut = tmp_path / "cut.pt"
    cut.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(cut)
    obj = torch.load(best, weights_only=True)
    meta = json.loads(obj["meta"])
    for change, message in ((dict(classes=["a", "b", "c"]), "3 classes"),
                            (dict(config={**meta["config"], "arch": "resnet34"}), "resnet34")):
        torch.save({**obj, "meta": json.dumps({**meta, **change})}, tmp_path / "other.pt")
        with pytest.raises(CheckpointError, match=message):
            model_from_checkpoint(tmp_path / "other.pt")


# ----------------------------------------------------------------------------------- training faults

def test_out_of_memory_halves_the_batch_then_fails_clearly(dot_folder, workspace, monkeypatch):
    import core.train.loop as train_mod
    real_step = train_mod.train_step
    calls = {"n": 0}

    def flaky(model, criterion, optimizer, scaler, x, y, amp, parts, weight=1.0, **kw):
        calls["n"] += 1
        if parts < 2:
            raise torch.OutOfMemoryError("simulated CUDA out of memory")
        return real_step(model, criterion, optimizer, scaler, x, y, amp, parts, weight, **kw)

    class Logs(train_mod.Reporter):
        lines = []

        def log(self, message):
            self.lines.append(message)

    monkeypatch.setattr(train_mod, "train_step", flaky)
    run = prepare_run(workspace, tiny_config(dot_folder, epochs=1))
    result = fit(workspace, run, Logs())
    assert result["status"] == "done"
    assert sum("processed in 2 parts" in line for line in Logs.lines) == 1  # halved once, then kept
    monkeypatch.setattr(train_mod, "train_step", lambda *a, **k: (_ for _ in ()).throw(
        torch.OutOfMemoryError("simulated CUDA out of memory")))
    run2 = prepare_run(workspace, tiny_config(dot_folder, epochs=1))
    with pytest.raises(TrainingError, match="out of GPU memory"):
        fit(workspace, run2)


def test_disk_full_during_checkpoint_keeps_the_previous_one(dot_folder, workspace, monkeypatch):
    import core.models.checkpoint as ckpt
    real_save = torch.save
    state = {"saves": 0}

    def save(obj, path, *a, **k):
        state["saves"] += 1
        if state["saves"] > 2:  # epoch 1 writes best and last; epoch 2 hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", save)
    # What a job's training process does (core/jobs/worker.py), in this process so that torch.save is the patched one.
    from core.jobs.worker import run_job
    run_id = prepare_run(workspace, tiny_config(dot_folder, epochs=3)).id
    run_job(workspace, run_id)
    row = workspace.run_row(run_id)
    assert row["status"] == "failed" and "No space left on device" in row["error"]
    assert "previous checkpoint is unchanged" in row["error"]
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    model, meta = model_from_checkpoint(workspace.run(run_id).best_path)
    assert meta["epoch"] == 1
    assert not [p for p in workspace.run(run_id).dir.iterdir() if p.name.endswith(".tmp")]


def test_weights_gone_nan_fail_the_run_and_keep_the_last_good_checkpoint(dot_folder, workspace, monkeypatch):
    import core.train.loop as train_mod
    # The loss of each step is checked, but the update after it can still turn weights into NaN (an overflow in
    # the optimizer, a running variance gone infinite): such a model must never replace a good checkpoint.
    real_step = train_mod.train_step
    steps = {"n": 0}

    def poisoning(model, *args, **kwargs):
        out = real_step(model, *args, **kwargs)
        steps["n"] += 1
        if steps["n"] == 6:  # epoch 2 (4 batches of 16 per epoch here)
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return out

    monkeypatch.setattr(train_mod, "train_step", poisoning)
    from core.jobs.worker import run_job
    run_id = prepare_run(workspace, tiny_config(dot_folder, epochs=3)).id
    run_job(workspace, run_id)
    row = workspace.run_row(run_id)
    assert row["status"] == "failed"
    assert "diverged" in row["error"] and "previous checkpoint is unchanged" in row["error"], row["error"]
    run = workspace.run(run_id)
    model, meta = model_from_checkpoint(run.best_path)
    assert meta["epoch"] == 1
    assert load_checkpoint(run.last_path)[1]["epoch"] == 1


@pytest.mark.slow
def test_killed_process_run_is_interrupted_then_resumes(tmp_path):
    data = write_class_folders(tmp_path / "d", per_class=30, size=32)
    ws_root = tmp_path / "ws"
    proc = subprocess.Popen([sys.executable, "-m", "core", "--workspace", str(ws_root), "train", "--data", str(data),
                             "--weights", "none", "--epochs", "200", "--batch-size", "8", "--image-size", "32",
                             # fp32 and a constant learning rate: this test is about the kill, not the recipe
                             "--recipe", "classic", "--amp", "off", "--quiet"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    from core.workspace.store import Workspace
    deadline = time.time() + 120
    run_dir = None
    while time.time() < deadline:
        # last.json is written after best.pt and last.pt: one epoch is then fully saved
        runs = list((ws_root / "runs").glob("*/last.json")) if (ws_root / "runs").exists() else []
        if runs:
            run_dir = runs[0].parent
            break
        time.sleep(0.2)
    assert run_dir is not None, proc.stderr.read() if proc.poll() is not None else "no checkpoint"
    time.sleep(0.3)  # killed somewhere in the next epoch
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ws = Workspace(ws_root)
    assert ws.run_row(run_dir.name)["status"] == "running"
    jm = JobManager(ws)  # the next start of the app
    assert run_dir.name in jm.interrupted
    assert ws.run_row(run_dir.name)["status"] == "interrupted"
    model_from_checkpoint(run_dir / "best.pt")
    done_epochs = load_checkpoint(run_dir / "last.pt")[1]["epoch"]
    jm.resume(run_dir.name, epochs=done_epochs + 1)
    snap = jm.wait(run_dir.name, timeout=120)
    assert snap.status == "done", snap.error
    assert [h["epoch"] for h in ws.run(run_dir.name).history()] == list(range(1, done_epochs + 2))


# ----------------------------------------------------------------------------------- sessions & load

@pytest.mark.slow
def test_concurrent_predictions_with_gradcam_while_training(trained, dot_folder, workspace):
    from core.deploy.predict import Predictor
    pred = Predictor(trained["run"].best_path)
    rng = np.random.default_rng(21)
    images = [Image.fromarray(make_dot_image(rng, trained["size"], dot=bool(i % 2))[0]) for i in range(6)]
    expected = [(pred.predict(im)[0]["top"][0]["label"], pred.explain(im)["heatmap"]) for im in images]
    jm = JobManager(workspace)
    run_id = jm.submit(tiny_config(dot_folder, epochs=3))
    errors = []

    def session(k):
        try:
            for j in range(4):
                i = (k + j) % len(images)
                label = pred.predict(images[i])[0]["top"][0]["label"]
                heat = pred.explain(images[i])["heatmap"]
                assert label == expected[i][0]
                assert np.abs(heat - expected[i][1]).max() < 1e-4
        except Exception as exc:  # collected, so a failure names its session
            errors.append(f"session {k}: {exc!r}")

    threads = [threading.Thread(target=session, args=(k,)) for k in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert jm.wait(run_id, timeout=120).status == "done"


def test_streamlit_server_settings():
    import tomllib
    cfg = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())["server"]
    assert cfg["enableXsrfProtection"] is True
    assert cfg["address"] in ("localhost", "127.0.0.1")
    assert 0 < cfg["maxUploadSize"] <= 4096


def test_predict_page_zip_reader_refuses_bombs_and_names_skipped_entries():
    """Uploads on the Predict page go through core's safe reader: counted sizes, not the ones a zip declares."""
    from core.data.zips import Limits, read_zip_images
    data = _zip(_good_entries() + [("set/notes.txt", b"hi"), ("../evil.png", _png_bytes())])
    images, skipped, more = read_zip_images(io.BytesIO(data), max_images=4)
    assert len(images) == 4 and more == 2 and all(b.startswith(b"\x89PNG") for _, b in images)
    assert dict(skipped) == {"set/notes.txt": "not an image file",
                             "../evil.png": "unsafe path (outside the dataset folder)"}
    bomb = _zip([("set/a/bomb.png", b"\0" * (50 * 2**20))])
    with pytest.raises(ImportError_, match="zip bomb"):
        read_zip_images(io.BytesIO(bomb))
    with pytest.raises(ImportError_, match="total limit"):
        read_zip_images(io.BytesIO(_zip(_good_entries())), limits=Limits(total=200))
    with pytest.raises(ImportError_, match="not a zip"):
        read_zip_images(io.BytesIO(b"no zip here"))


def _corrupted(entries, method, name) -> bytes:
    """A zip whose entry `name` (compressed with `method`) has its compressed data scrambled mid-way."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for entry, data in entries:
            zf.writestr(entry, data)
    data = bytearray(buf.getvalue())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        info = zf.getinfo(name)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for i in range(start + info.compress_size // 3, start + info.compress_size // 3 + 16):
        data[i] ^= 0x5A
    return bytes(data)


def _noisy_png(seed: int) -> bytes:  # random pixels: compressed data long enough to scramble its middle
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("method", [zipfile.ZIP_LZMA, zipfile.ZIP_BZIP2, zipfile.ZIP_DEFLATED])
def test_a_corrupt_entry_is_skipped_and_named_and_the_rest_imported(tmp_path, method):
    entries = [(f"set/{c}/{i}.png", _noisy_png(i + 10 * k)) for k, c in enumerate(("ok", "nok")) for i in range(3)]
    data = _corrupted(entries, method, "set/ok/1.png")
    result = import_zip(io.BytesIO(data), tmp_path / "datasets", name="parts")
    assert result.files == 5 and "corrupt entry" in dict(result.skipped)["set/ok/1.png"]
    assert not (result.path / "ok" / "1.png").exists()  # nothing half-written is left
    from core.data.zips import read_zip_images
    images, skipped, _ = read_zip_images(io.BytesIO(data))
    assert len(images) == 5 and "corrupt entry" in dict(skipped)["set/ok/1.png"]


def test_names_marked_utf8_that_are_not_are_refused_with_a_reason(tmp_path):
    data = _zip([("set/a/\u00e9t\u00e9.png", _png_bytes()), ("set/b/1.png", _png_bytes())])
    data = data.replace("\u00e9t\u00e9".encode(), b"\xfft\xfe\xff\xfe")  # same length; the UTF-8 flag stays set
    with pytest.raises(ImportError_, match="not valid UTF-8"):
        import_zip(io.BytesIO(data), tmp_path / "datasets", name="x")
    from core.data.zips import read_zip_images
    with pytest.raises(ImportError_, match="not valid UTF-8"):
        read_zip_images(io.BytesIO(data))
    assert list((tmp_path / "datasets").iterdir()) == []


def test_clashing_entries_are_skipped_one_by_one_not_the_whole_import(tmp_path):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate it is asked to write
        data = _zip(_good_entries() + [("set/ok/0.png", _png_bytes((0, 0, 255))),   # a second set/ok/0.png
                                       ("set/ok/" + "n" * 300 + ".png", _png_bytes()),  # over NAME_MAX
                                       ("set/nok/2.png/inner.png", _png_bytes())])      # a folder named as a file
    result = import_zip(io.BytesIO(data), tmp_path / "datasets", name="parts")
    reasons = dict(result.skipped)
    assert result.files == 6
    assert "same name" in reasons["set/ok/0.png"] and "too long" in reasons["set/ok/" + "n" * 300 + ".png"]
    assert "a file and a folder" in reasons["set/nok/2.png/inner.png"]
    assert open_image(result.path / "ok" / "0.png").getpixel((0, 0)) == (200, 10, 10)  # the first one kept


def test_an_import_that_would_not_fit_on_the_disk_is_refused_before_extracting(tmp_path, monkeypatch):
    import shutil

    import core.data.zips as zips
    real = shutil.disk_usage
    monkeypatch.setattr(zips.shutil, "disk_usage", lambda p: real(p)._replace(free=zips.DISK_RESERVE + 100))
    with pytest.raises(ImportError_, match="GB is free"):
        import_zip(io.BytesIO(_zip(_good_entries())), tmp_path / "datasets", name="x")
    assert list((tmp_path / "datasets").iterdir()) == []


def test_a_killed_imports_folder_is_swept_up_by_the_next_import(tmp_path):
    datasets = tmp_path / "datasets"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (datasets / f".import-{dead.pid}-abc123" / "set" / "ok").mkdir(parents=True)  # as a killed import left it
    live = datasets / f".import-{os.getppid()}-xyz789"  # another process's import in progress
    live.mkdir()
    import_zip(io.BytesIO(_zip(_good_entries())), datasets, name="parts")
    assert sorted(p.name for p in datasets.iterdir()) == sorted(["parts", live.name])


def test_a_zip_named_like_a_registered_dataset_does_not_replace_it(tmp_path):
    from core.workspace.store import NameTaken, Workspace
    ws = Workspace(tmp_path / "ws")
    ws.register_dataset("parts", "/data/parts")
    result = import_zip(io.BytesIO(_zip(_good_entries())), ws.root / "datasets", name="parts",
                        taken={d["name"] for d in ws.list_datasets()})
    assert result.name == "parts-2"
    with pytest.raises(NameTaken, match="registered already"):
        ws.register_dataset("parts", str(result.path))
    ws.register_dataset("parts", "/data/parts")  # the same registration again is fine
    assert {d["name"]: d["source"] for d in ws.list_datasets()} == {"parts": "/data/parts"}


@pytest.mark.slow
def test_the_training_thread_serves_the_next_job_after_the_database_failed_under_one(dot_folder, workspace,
                                                                                     monkeypatch):
    """A job whose start fails and whose failure cannot be recorded either (the database unreadable, a full disk)
    must not take the one training thread with it: the next job still trains."""
    import sqlite3

    from core.jobs import queue as jobs
    real_start, real_transition = jobs.worker.start_process, jobs.runs.transition
    calls = {"transition": 0}

    def broken_start(*args, **kwargs):
        raise RuntimeError("the training process could not be set up")

    def unwritable_transition(*args, **kwargs):
        calls["transition"] += 1
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(jobs.worker, "start_process", broken_start)
    monkeypatch.setattr(jobs.runs, "transition", unwritable_transition)
    jm = JobManager(workspace)
    first = jm.submit(tiny_config(dot_folder, epochs=1))
    jm.wait(first, timeout=60)
    assert calls["transition"] == 1  # the failure was tried to be recorded, and could not be
    monkeypatch.setattr(jobs.worker, "start_process", real_start)
    monkeypatch.setattr(jobs.runs, "transition", real_transition)
    second = jm.submit(tiny_config(dot_folder, epochs=1))
    snap = jm.wait(second, timeout=180)
    assert snap.status == "done", snap.error
