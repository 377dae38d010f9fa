"""Training: it learns, stops within a batch, fails cleanly, checkpoints safely, resumes."""
import json
import threading
import time

import pytest
import torch

from conftest import tiny_config
from core.config import ConfigError, TrainConfig
from core.jobs.queue import JobManager
from core.models.checkpoint import load_checkpoint
from core.models.resnet import WeightsError, build_model, model_from_checkpoint
from core.runs.life import Reporter, TrainingError, prepare_run
from core.train.loop import fit


def test_config_defaults_follow_the_seeds():
    c = TrainConfig(data="x")
    assert (c.optimizer, c.lr, c.epochs, c.batch_size, c.weight_decay, c.image_size, c.normalization) == \
        ("adam", 1e-3, 10, 32, 0.0, 224, "imagenet")
    assert c.validate() is c


@pytest.mark.parametrize("field,value", [("lr", 0), ("epochs", 0), ("image_size", 0), ("batch_size", 0),
                                         ("dropout", 1.5), ("optimizer", "rmsprop")])
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ConfigError) as err:
        TrainConfig(data="x", **{field: value}).validate()
    assert err.value.field == field


def test_batch_larger_than_dataset_refused_before_start(dot_folder, workspace):
    with pytest.raises(ConfigError, match="batch_size"):
        prepare_run(workspace, tiny_config(dot_folder, batch_size=500))
    assert workspace.list_runs() == []


def test_learns_a_separable_set(dot_folder, workspace):
    run = prepare_run(workspace, tiny_config(dot_folder, epochs=6))
    result = fit(workspace, run)
    assert result["status"] == "done"
    assert result["best_val_acc"] >= 0.9
    hist = run.history()
    assert [h["epoch"] for h in hist] == list(range(1, 7))
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"} <= set(hist[0])
    assert run.evaluation()["accuracy"] >= 0.8


@pytest.mark.parametrize("arch", ["resnet18-custom", "resnet34", "resnet50"])
def test_every_architecture_builds_and_steps(arch):
    model = build_model(arch, 3, weights="none", dropout=0.2)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 3)
    out.sum().backward()


def test_custom_resnet18_matches_torchvision_layout():
    import torchvision
    ours = build_model("resnet18-custom", 10).state_dict()
    theirs = torchvision.models.resnet18(num_classes=10).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_frozen_backbone_trains_only_the_head():
    model = build_model("resnet18", 2, freeze_backbone=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"]


def test_offline_imagenet_gives_clear_message(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    import torchvision.models._api as api

    def offline(self, *a, **kw):
        raise OSError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(api.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(WeightsError) as err:
        build_model("resnet18", 2, weights="imagenet")
    msg = str(err.value)
    assert "offline" in msg and "--weights none" in msg and "resnet18-f37072fd.pth" in msg


def test_local_weights_file_loads_backbone_and_refuses_other_models(tmp_path):
    src = build_model("resnet18", 1000)
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    model = build_model("resnet18", 2, weights=str(tmp_path / "r18.pth"))
    assert torch.equal(model.conv1.weight, src.conv1.weight)
    assert model.fc.out_features == 2
    torch.save(build_model("resnet34", 1000).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(WeightsError, match="does not match resnet18"):
        build_model("resnet18", 2, weights=str(tmp_path / "r34.pth"))


class StopAfter(Reporter):
    def __init__(self, batches):
        self.batches_left = batches
        self.seen = 0

    def batch(self, epoch, batch, batches, images_per_s):
        self.seen += 1
        self.batches_left -= 1

    def should_stop(self):
        return self.batches_left <= 0


def test_stop_within_a_batch_keeps_best_checkpoint(dot_folder, workspace):
    run = prepare_run(workspace, tiny_config(dot_folder, epochs=50, batch_size=8))
    steps_per_epoch = -(-len(run.split()["train"]) // 8)
    reporter = StopAfter(steps_per_epoch + 2)  # one full epoch, then two batches of the second
    result = fit(workspace, run, reporter)
    assert result["status"] == "stopped"
    assert reporter.seen == steps_per_epoch + 2
    assert result["epochs_done"] == 1
    _, meta, _ = load_checkpoint(run.best_path)
    assert meta["epoch"] == 1
    assert run.eval_path.exists()  # the kept checkpoint is still evaluated


def test_checkpoints_load_with_weights_only(trained):
    run = trained["run"]
    for path in (run.best_path, run.last_path):
        obj = torch.load(path, weights_only=True)
        meta = json.loads(obj["meta"])
        assert meta["classes"] == ["blank", "dot"]
        assert meta["config"]["arch"] == "resnet18"
        assert set(meta["normalization"]) == {"mean", "std"}
        assert json.loads(path.with_suffix(".json").read_text())["epoch"] == meta["epoch"]
    last = torch.load(run.last_path, weights_only=True)
    assert {"optimizer", "generator"} <= set(last)
    model, meta = model_from_checkpoint(run.best_path)
    assert meta["epoch"] == json.loads(run.best_path.with_suffix(".json").read_text())["epoch"]


def test_resume_continues_at_the_next_epoch(dot_folder, workspace):
    run = prepare_run(workspace, tiny_config(dot_folder, epochs=3, schedule="cosine"))
    steps = -(-len(run.split()["train"]) // 16)
    result = fit(workspace, run, StopAfter(2 * steps + 1))
    assert result["status"] == "stopped" and result["epochs_done"] == 2
    lr_epoch2 = run.history()[1]["lr"]
    resumed = fit(workspace, run, resume=True)
    assert resumed["status"] == "done"
    hist = run.history()
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert hist[1]["lr"] == lr_epoch2
    # Cosine over 3 epochs: epoch 3 runs at lr * (1 + cos(2*pi/3)) / 2 = 0.25 * lr (scheduler state restored).
    assert hist[2]["lr"] == pytest.approx(0.25e-3, rel=1e-6)
    _, meta, _ = load_checkpoint(run.last_path)
    assert meta["epoch"] == 3


def test_checkpoint_due_bounds_the_time_spent_writing():
    from core.train.loop import WRITE_EVERY_COST, checkpoint_due
    assert checkpoint_due(False, None, 0.0)  # the first epoch
    assert checkpoint_due(True, 0.01, 5.0)   # the final one, however recent the last write
    assert not checkpoint_due(False, 0.3 * WRITE_EVERY_COST - 0.01, 0.3)  # a 0.3 s write, too recent
    assert checkpoint_due(False, 0.3 * WRITE_EVERY_COST, 0.3)
    assert checkpoint_due(False, 120.0, 0.3)  # a CPU epoch of minutes: every epoch


def test_paced_checkpoints_keep_the_best_epoch_and_resume_from_the_last_written(dot_folder, workspace, monkeypatch):
    # Writes made to look too costly to repeat: only epoch 1 is written during the loop. The better epochs after
    # it are held in memory; a stop must still leave the best epoch's weights in best.pt.
    import core.train.loop as train_mod
    monkeypatch.setattr(train_mod, "WRITE_EVERY_COST", 1e9)
    run = prepare_run(workspace, tiny_config(dot_folder, epochs=6))
    steps = -(-len(run.split()["train"]) // 16)
    result = fit(workspace, run, StopAfter(4 * steps + 1))
    assert result["status"] == "stopped" and result["epochs_done"] == 4
    best_epoch = max(run.history(), key=lambda h: (h["val_acc"], -h["val_loss"]))["epoch"]
    assert best_epoch > 1, [(h["val_acc"], round(h["val_loss"], 4)) for h in run.history()]  # else it shows nothing
    _, best_meta, _ = load_checkpoint(run.best_path)
    assert best_meta["epoch"] == best_epoch  # held in memory, written when the loop ended
    assert load_checkpoint(run.last_path)[1]["epoch"] == 1
    resumed = fit(workspace, run, resume=True)
    assert resumed["status"] == "done"
    assert [h["epoch"] for h in run.history()] == [1, 2, 3, 4, 5, 6]  # epochs 2-4 trained again, once each
    assert load_checkpoint(run.last_path)[1]["epoch"] == 6  # the final epoch is always written


def test_resume_without_a_finished_epoch_is_refused(dot_folder, workspace):
    run = prepare_run(workspace, tiny_config(dot_folder))
    with pytest.raises(TrainingError, match="no completed epoch"):
        fit(workspace, run, resume=True)


def test_diverging_loss_fails_without_a_nan_checkpoint(dot_folder, workspace):
    # Epoch 1 trains at 1e-3; the step schedule then multiplies the rate by 1e30, and epoch 2 diverges.
    run = prepare_run(workspace, tiny_config(dot_folder, optimizer="sgd", epochs=3, schedule="step", step_size=1,
                                             step_gamma=1e30))
    with pytest.raises(TrainingError, match="diverged: the loss became (nan|inf) at epoch 2") as err:
        fit(workspace, run)
    assert "No checkpoint was written for it" in str(err.value)  # the guard's own words: it fired
    assert [h["epoch"] for h in run.history()] == [1]
    for path in (run.best_path, run.last_path):
        model, meta = model_from_checkpoint(path)  # refuses NaN weights, so loading proves they are finite
        assert meta["epoch"] == 1


def test_job_manager_runs_in_background_and_reports(dot_folder, workspace):
    jm = JobManager(workspace)
    run_id = jm.submit(tiny_config(dot_folder, epochs=2), request_id="click-1")
    assert jm.submit(tiny_config(dot_folder, epochs=2), request_id="click-1") == run_id  # double click
    snap = jm.wait(run_id, timeout=120)
    assert snap.status == "done", snap.error
    assert len(snap.history) == 2 and snap.progress == 1.0
    assert any("epoch 2/2" in line for line in snap.log)
    assert workspace.run_row(run_id)["status"] == "done"
    assert len(workspace.list_runs()) == 1


def test_job_stop_is_honoured_and_queue_runs_one_at_a_time(dot_folder, workspace):
    jm = JobManager(workspace)
    first = jm.submit(tiny_config(dot_folder, epochs=200, batch_size=8))
    second = jm.submit(tiny_config(dot_folder, epochs=1))
    assert jm.queued() == [first, second] or jm.queued() == [second]
    assert jm.snapshot(second).status == "queued"
    # Wait for a finished epoch (a loaded 2-core machine can take more than 30 s for the first), then stop.
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        s = jm.snapshot(first)
        if s.status == "running" and s.history:
            break
        threading.Event().wait(0.05)
    assert s.history, "the first job finished no epoch in 180 s"
    assert jm.snapshot(second).status == "queued"
    assert jm.stop(first)
    snap = jm.wait(first, timeout=60)
    assert snap.status == "stopped" and snap.history
    assert workspace.run(first).best_path.exists()
    assert jm.wait(second, timeout=120).status == "done"


def test_failing_job_reports_its_error_and_the_worker_lives_on(dot_folder, workspace, tmp_path):
    jm = JobManager(workspace)
    # A weights file that exists (prepare_run accepts it) but holds no state_dict: the training process fails
    # while building the model, and says why.
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    bad = jm.submit(tiny_config(dot_folder, epochs=1, weights=str(tmp_path / "broken.pth")))
    snap = jm.wait(bad, timeout=60)
    assert snap.status == "failed" and "broken.pth" in snap.error
    assert workspace.run_row(bad)["status"] == "failed"
    good = jm.submit(tiny_config(dot_folder, epochs=1))
    assert jm.wait(good, timeout=60).status == "done"


def test_crashed_process_leaves_run_interrupted(dot_folder, workspace):
    run = prepare_run(workspace, tiny_config(dot_folder))
    workspace.update_run(run.id, status="running", pid=2**22 + 12345)  # a pid that does not exist
    JobManager(workspace)
    assert workspace.run_row(run.id)["status"] == "interrupted"


def test_the_training_forward_is_eager_off_cuda_and_falls_back_when_a_graph_cannot_be_captured():
    # core/train/graphs.py: CUDA graphs only on one CUDA device; this is the twin every CPU runs. A graph that cannot be
    # captured (here: no CUDA at all) must leave training eager and say so once, with the same logits.
    from core.train.graphs import EagerForward, GraphedForward, build_forward
    torch.manual_seed(0)
    model = build_model("resnet18", 3, "none").train()
    cpu = torch.device("cpu")
    assert type(build_forward(model, None, cpu, True, 4)) is EagerForward
    lines = []
    graphed = GraphedForward(model, None, batch_size=4, log=lines.append)
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    ref = EagerForward(model, None)(x).detach()
    out = graphed(x)
    assert out.dtype == torch.float32 and out.requires_grad
    # BatchNorm in training mode normalizes by the batch: the same input gives the same logits
    torch.testing.assert_close(out.detach(), ref)
    graphed(x)
    assert graphed.failed and len(lines) == 1 and "CUDA graphs off" in lines[0]


def _scripted_validation(monkeypatch, accuracies):
    """fit()'s per-epoch validation returns these accuracies in turn (training itself runs as usual)."""
    import core.train.loop
    scores = iter(accuracies)

    def validate(t, part, reporter, model=None):
        acc = next(scores)
        return {f"{part}_loss": 1.0 - acc, f"{part}_acc": acc}
    monkeypatch.setattr(core.train.loop, "validate", validate)


def test_early_stopping_stops_after_patience_epochs_without_improvement(dot_folder, workspace, monkeypatch):
    _scripted_validation(monkeypatch, [0.6, 0.7, 0.65, 0.65, 0.9, 0.9])
    lines = []

    class Log(Reporter):
        def log(self, message):
            lines.append(message)
    run = prepare_run(workspace, tiny_config(dot_folder, epochs=6, early_stop_patience=2))
    result = fit(workspace, run, reporter=Log())
    assert [row["epoch"] for row in result["history"]] == [1, 2, 3, 4]
    assert load_checkpoint(run.best_path)[1]["epoch"] == 2
    assert "early stopping: no improvement of val_acc for 2 epochs" in lines


def test_early_stopping_waits_for_the_full_size_with_progressive_resizing(dot_folder, workspace, monkeypatch):
    """Progressive resizing's small-image epochs validate at the full size and read low (ELPV: 31% after epoch 2):
    counted as stale, they stopped a run with patience 2 at its 3rd epoch, before it had trained at full size."""
    _scripted_validation(monkeypatch, [0.7, 0.4, 0.4, 0.4, 0.6, 0.6, 0.6, 0.6])
    cfg = tiny_config(dot_folder, image_size=64, epochs=8, progressive_start=0.5, early_stop_patience=2)
    result = fit(workspace, prepare_run(workspace, cfg))
    assert [row["train_size"] for row in result["history"]] == [32, 32, 48, 48, 64, 64]
