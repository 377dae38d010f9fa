"""The seams between the engine's stages: the learning-rate schedule on start, resume and extension; one
inference path for every consumer of probabilities; one owner of a run's status."""
import json

import numpy as np
import pytest
import torch

from conftest import tiny_config, train_small_run, write_class_folders
from core.config import TrainConfig
from core.deploy.predict import Predictor
from core.infer.evaluate import read_predictions
from core.jobs.queue import JobManager
from core.runs import life as runs
from core.runs.life import RunStateError, prepare_run
from core.train.loop import fit
from core.train.schedule import epoch_batches, lr_at


def _train(ws, cfg):
    run = prepare_run(ws, cfg)
    result = runs.execute(ws, run.id, lambda: fit(ws, run), runs.Reporter())
    assert result["status"] == "done", result
    return run


# ---------------------------------------------------------------------------------------------- schedule

@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_onecycle_is_torchs_onecycle_as_a_pure_function(optimizer):
    cfg = TrainConfig(data="x", lr=2e-3, epochs=5, schedule="onecycle", optimizer=optimizer)
    steps = 7
    param = torch.nn.Parameter(torch.zeros(1))
    opt = (torch.optim.SGD([param], lr=cfg.lr, momentum=0.9) if optimizer == "sgd"
           else torch.optim.AdamW([param], lr=cfg.lr))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps)
    for step in range(cfg.epochs * steps):
        lr, momentum = lr_at(cfg, step, steps)
        group = opt.param_groups[0]
        assert lr == pytest.approx(group["lr"], rel=1e-9)
        assert momentum == pytest.approx(group["betas"][0] if "betas" in group else group["momentum"], rel=1e-9)
        opt.step()
        sched.step()


def test_cosine_and_step_schedules_at_epoch_starts():
    cos = TrainConfig(data="x", lr=1.0, epochs=4, schedule="cosine")
    assert [lr_at(cos, e * 10, 10)[0] for e in range(4)] == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466])
    step = TrainConfig(data="x", lr=1.0, epochs=6, schedule="step", step_size=2, step_gamma=0.1)
    assert [lr_at(step, e * 3, 3)[0] for e in range(6)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert epoch_batches(33, 16) == 2 and epoch_batches(32, 16) == 2 and epoch_batches(31, 16) == 2


def test_an_extension_is_a_new_cycle_over_the_added_epochs():
    cfg = TrainConfig(data="x", lr=1.0, epochs=6, schedule="cosine", schedule_start_epoch=4)
    assert lr_at(cfg, 4 * 10, 10)[0] == pytest.approx(1.0)      # epoch 5 starts the new decay at full rate
    assert lr_at(cfg, 5 * 10, 10)[0] == pytest.approx(0.5)      # halfway through the two added epochs
    one = TrainConfig(data="x", lr=1.0, epochs=6, schedule="onecycle", schedule_start_epoch=4)
    assert lr_at(one, 40, 10)[0] == pytest.approx(1.0 / 25)     # a fresh warm-up
    assert max(lr_at(one, s, 10)[0] for s in range(40, 60)) == pytest.approx(1.0, rel=1e-3)


# ------------------------------------------------------------------------------------ resume and extend

@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_extending_a_finished_run_trains_the_added_epochs_on_a_new_cycle(dot_folder, workspace, schedule):
    """Bug: 'Train up to epoch N' on a finished one-cycle run raised 'Tried to step 7 times'; a cosine run
    trained the added epochs at learning rate 0."""
    run = _train(workspace, tiny_config(dot_folder, epochs=2, schedule=schedule, optimizer="adamw"))
    best_before = json.loads(run.best_path.with_suffix(".json").read_text())
    jm = JobManager(workspace)
    jm.resume(run.id, epochs=4)  # what the Runs page does
    snap = jm.wait(run.id, timeout=120)
    assert snap.status == "done", snap.error
    hist = run.history()
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    steps = epoch_batches(len(run.split()["train"]), 16)
    expected = lr_at(run.config(), 2 * steps, steps)[0]
    assert hist[2]["lr"] == pytest.approx(expected)
    assert hist[2]["lr"] == pytest.approx(1e-3 / 25 if schedule == "onecycle" else 1e-3)
    assert min(h["lr"] for h in hist[2:]) > 0
    cfg = run.config()
    assert (cfg.epochs, cfg.schedule_start_epoch) == (4, 2)
    best_after = json.loads(run.best_path.with_suffix(".json").read_text())
    assert best_after["best"]["val_acc"] >= best_before["best"]["val_acc"]  # replaced only by a better epoch
    with pytest.raises(RunStateError, match="ask for more than 4"):
        jm.resume(run.id, epochs=4)


def test_a_stopped_run_continues_its_own_schedule(dot_folder, workspace):
    from test_train import StopAfter
    run = prepare_run(workspace, tiny_config(dot_folder, epochs=4, schedule="cosine"))
    steps = epoch_batches(len(run.split()["train"]), 16)
    result = runs.execute(workspace, run.id, lambda: fit(workspace, run, StopAfter(2 * steps + 1)), runs.Reporter())
    assert result["status"] == "stopped" and result["epochs_done"] == 2
    runs.prepare_resume(workspace, run.id)
    assert runs.execute(workspace, run.id, lambda: fit(workspace, run, resume=True), runs.Reporter())["status"] == "done"
    lrs = [h["lr"] for h in run.history()]
    assert lrs == pytest.approx([1e-3 * (1 + np.cos(np.pi * e / 4)) / 2 for e in range(4)])
    assert run.config().schedule_start_epoch == 0


# ------------------------------------------------------------------------------------ one inference path

@pytest.fixture(scope="module", params=[True, False], ids=["tta", "plain"])
def small_run(request, tmp_path_factory):
    ws, run = train_small_run(tmp_path_factory.mktemp("inference"), request.param, seed=3)
    return {"ws": ws, "run": run, "tta": request.param}


def test_every_consumer_gets_the_evaluations_probabilities(small_run):
    """Bug: with TTA the Predict page and `core predict` disagreed with predictions.csv by up to 0.21."""
    run = small_run["run"]
    rows = read_predictions(run)
    assert rows and run.evaluation()["tta"] is small_run["tta"]
    paths = [r["path"] for r in rows]
    saved = np.array([[float(r["p_blank"]), float(r["p_dot"])] for r in rows])
    pred = Predictor(run.best_path)
    batched = np.array([[r["probs"]["blank"], r["probs"]["dot"]] for r in pred.predict(paths)])
    one_by_one = np.array([[r["probs"]["blank"], r["probs"]["dot"]] for p in paths for r in pred.predict(p)])
    explained = np.array([[e["probs"]["blank"], e["probs"]["dot"]] for e in map(pred.explain, paths)])
    for probs in (batched, one_by_one, explained):
        assert np.abs(probs - saved).max() < 1e-5
    # Grad-CAM's top-k is the prediction's top-k
    top = pred.explain(paths[0], top_k=2)["top"]
    assert [t["label"] for t in top] == [t["label"] for t in pred.predict(paths[0], top_k=2)[0]["top"]]
    # The TTA run really averages flips, so the comparison above is between TTA probabilities everywhere. Seen at a
    # high temperature: a well-trained model's probabilities sit at 0 and 1, where flips cannot move them.
    clf = pred.classifier
    x = torch.from_numpy(np.stack([pred.image(p) for p in paths[:8]]))
    tta, temperature = clf.tta, clf.temperature
    try:
        clf.temperature = 1000.0
        clf.tta = True
        with_flips = clf.probs(x)
        clf.tta = False
        without = clf.probs(x)
    finally:
        clf.tta, clf.temperature = tta, temperature
    assert np.abs(with_flips - without).max() > 1e-5
    assert tta is small_run["tta"]


def test_crossval_folds_use_the_same_inference(tmp_path, workspace):
    from core.studies.curation import crossval
    root = write_class_folders(tmp_path / "d", per_class=12, size=32, seed=5)
    run = prepare_run(workspace, tiny_config(root, epochs=1, batch_size=8, tta=True, test_fraction=0.0))
    assert crossval(workspace, run, runs.Reporter(), folds=2)["status"] == "done"
    fold = run.dir / "fold1"
    rows = read_predictions(type(run)(run.id + "-fold1", fold))
    pred = Predictor(fold / "best.pt")
    got = pred.predict([r["path"] for r in rows])
    for r, g in zip(rows, got):
        assert abs(g["probs"]["dot"] - float(r["p_dot"])) < 1e-5


# ------------------------------------------------------------------------------------ a run's status

def test_status_moves_only_along_the_runs_life(dot_folder, workspace):
    run = prepare_run(workspace, tiny_config(dot_folder, epochs=1))
    assert runs.status(workspace, run.id) == "queued"
    with pytest.raises(RunStateError, match="cannot become done"):
        runs.transition(workspace, run.id, "done")
    runs.transition(workspace, run.id, "running")
    runs.transition(workspace, run.id, "stopping")
    runs.transition(workspace, run.id, "stopped")
    with pytest.raises(RunStateError, match="no finished epoch"):
        runs.prepare_resume(workspace, run.id)
    row = workspace.run_row(run.id)
    assert row["started"] and row["finished"] >= row["started"]


def test_a_failed_run_records_why(dot_folder, workspace):
    run = prepare_run(workspace, tiny_config(dot_folder, epochs=1))

    def broken():
        raise runs.TrainingError("the disk went away")
    result = runs.execute(workspace, run.id, broken, runs.Reporter())
    assert result == {"status": "failed", "error": "the disk went away"}
    row = workspace.run_row(run.id)
    assert row["status"] == "failed" and row["error"] == "the disk went away"


# ------------------------------------------------------------------------------------ precision by measurement

@pytest.fixture
def fresh_precision(tmp_path, monkeypatch):
    import core.models.device as dev
    monkeypatch.setenv("STUDIO_PRECISION_CACHE", str(tmp_path / "precision.json"))
    monkeypatch.setattr(dev, "_measured", {})
    monkeypatch.setattr(dev, "cpu_supports_bf16", lambda: True)
    return dev


@pytest.mark.parametrize("fp32_s,bf16_s,chosen", [(1.0, 1.02, None), (1.0, 0.42, torch.bfloat16)],
                         ids=["xeon-like-0.98x", "epyc-like-2.4x"])
def test_cpu_bf16_only_where_measured_faster(fresh_precision, monkeypatch, fp32_s, bf16_s, chosen):
    dev, cpu, calls = fresh_precision, torch.device("cpu"), []
    monkeypatch.setattr(dev, "time_training_steps", lambda: calls.append(1) or {"fp32_s": fp32_s, "bf16_s": bf16_s})
    assert dev.autocast_dtype(cpu, "auto") == chosen
    assert dev.autocast_dtype(cpu, "bf16") == torch.bfloat16 and dev.autocast_dtype(cpu, "off") is None
    monkeypatch.setattr(dev, "_measured", {})  # another process on the same machine: reads the file
    assert dev.autocast_dtype(cpu, "auto") == chosen and calls == [1]
    saved = json.loads((dev.precision_cache_path()).read_text())
    assert [v["speedup"] for v in saved.values()] == [pytest.approx(fp32_s / bf16_s, abs=1e-3)]
    used = dev.describe_device(cpu).split(", ")[1].split(":")[0]
    assert used == ("bf16" if chosen else "fp32")


def test_a_cpu_of_the_same_name_but_another_generation_measures_again(fresh_precision, monkeypatch):
    """A home directory kept across machines: a VM's CPU is often just "AMD EPYC", whatever its generation."""
    dev, calls = fresh_precision, []
    monkeypatch.setattr(dev, "cpu_name", lambda: "AMD EPYC")
    monkeypatch.setattr(dev, "time_training_steps", lambda: calls.append(1) or {"fp32_s": 1.0, "bf16_s": 0.5 * len(calls)})
    monkeypatch.setattr(dev, "cpu_signature", lambda: "family 25 model 17 stepping 1; avx2 avx512f avx512_bf16")
    assert dev.cpu_bf16_measurement()["bf16"] is True               # 2x: measured on the first machine
    monkeypatch.setattr(dev, "_measured", {})                       # a later process on another machine
    monkeypatch.setattr(dev, "cpu_signature", lambda: "family 26 model 2 stepping 1; avx2 avx512f avx512_bf16")
    assert dev.cpu_bf16_measurement()["bf16"] is False and calls == [1, 1]  # 1x: its own measurement
    assert len(json.loads(dev.precision_cache_path().read_text())) == 2


def test_the_cpu_signature_names_family_model_and_precision_flags():
    from core.models.device import cpu_signature
    sig = cpu_signature()
    if sig:  # Linux
        assert sig.startswith("family ") and ("avx2" in sig or "no avx2" in sig)


def test_the_calibration_times_real_steps_and_leaves_the_random_state_alone():
    from core.models.device import time_training_steps
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    t = time_training_steps(size=32, batch=4, steps=1)
    assert set(t) == {"fp32_s", "bf16_s"} and all(0 < v < 60 for v in t.values())
    # A run seeds torch, then (first on a machine) measures: its initial weights must be the seed's all the same.
    assert torch.equal(torch.rand(3), expected)


def test_a_seed_trains_alike_whether_or_not_the_process_measured_the_precision(fresh_precision, dot_folder,
                                                                             tmp_path):
    from conftest import tiny_config
    from core.runs.life import prepare_run
    from core.train.loop import fit
    from core.workspace.store import Workspace
    losses = []
    for name in ("measures", "reads"):  # the first fit measures bf16 (fresh cache file), the second reads it
        ws = Workspace(tmp_path / name)
        run = prepare_run(ws, tiny_config(dot_folder, epochs=1, amp="off"))
        fit(ws, run)
        losses.append(run.history()[0]["train_loss"])
    assert fresh_precision.precision_cache_path().exists()
    assert losses[0] == losses[1]


# ------------------------------------------------------------------------------------ time estimate

def test_the_estimate_is_the_runs_arithmetic():
    from core.train.estimate import estimate_seconds
    # decode 1400 images x 10 ms on 2 threads = 7 s; an epoch = 1000/50 + 200/3/50 s; the test with TTA = 3 passes
    got = estimate_seconds(10, 1000, 200, 200, images_per_s=50, decode_s_per_image=0.01, tta=True, workers=2)
    assert got == pytest.approx(7 + 10 * (20 + 200 / 3 / 50) + 200 / 3 * 3 / 50)
    assert estimate_seconds(1, 100, 0, 0, images_per_s=100) == pytest.approx(1.0)
    # checkpoints: a 1 s epoch with 0.05 s of writes writes every epoch; with 0.5 s of writes (longer than a
    # ninth of the epoch) it is written every few epochs, adding a ninth of the epoch
    assert estimate_seconds(10, 100, 0, 0, images_per_s=100, write_s=0.05) == pytest.approx(10 * 1.05)
    assert estimate_seconds(10, 100, 0, 0, images_per_s=100, write_s=0.5) == pytest.approx(10 * (1 + 1 / 9))


def test_an_estimate_times_the_engines_own_step(dot_folder, workspace):
    from core.train.estimate import estimate_run
    est = estimate_run(workspace, tiny_config(dot_folder, epochs=3, batch_size=8))
    assert est.images_per_s > 0 and est.decode_s_per_image > 0 and est.seconds > 0
    assert sum(est.counts.values()) == 60 and est.text().startswith("about ")
    assert workspace.list_runs() == []  # nothing was trained or created


def test_channel_stats_are_the_pixels_mean_and_std():
    from core.data.cache import channel_stats
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (300, 8, 9, 3), dtype=np.uint8)
    images[..., 2] //= 4  # a darker, narrower third channel
    idx = np.arange(3, 300, 2)  # a subset, as the training part is
    mean, std = channel_stats(images, idx)
    ref = images[idx].reshape(-1, 3) / 255.0
    assert mean == pytest.approx(ref.mean(0).tolist(), abs=1e-6)
    assert std == pytest.approx(ref.std(0).tolist(), abs=1e-6)
    big = np.concatenate([images] * 2)  # 600 images: three chunks
    assert channel_stats(big, np.arange(600))[0] == pytest.approx((big.reshape(-1, 3) / 255.0).mean(0).tolist(), abs=1e-6)
    # Images kept on the GPU are counted where they are (a CPU tensor takes the same path here)
    assert channel_stats(torch.from_numpy(big), np.arange(600)) == channel_stats(big, np.arange(600))
    with pytest.raises(TypeError, match="8-bit"):
        channel_stats(torch.from_numpy(big).float(), np.arange(600))


def test_a_grayscale_file_decodes_to_the_pixels_it_has_as_rgb(tmp_path):
    # load_array resizes a grayscale file before it becomes RGB (a third of the work): the pixels must be the ones
    # the RGB route gives, at shrinking, enlarging and odd sizes.
    from PIL import Image

    from core.data.images import load_array, open_image, resize_to_array
    rng = np.random.default_rng(1)
    path = tmp_path / "gray.png"
    Image.fromarray(rng.integers(0, 256, (300, 290), dtype=np.uint8), "L").save(path)
    for hw in [(160, 160), (96, 128), (300, 290), (451, 333), (17, 5)]:
        fast = load_array(path, hw)
        assert fast.shape == (*hw, 3)
        np.testing.assert_array_equal(fast, resize_to_array(open_image(path), hw))
