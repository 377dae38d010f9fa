"""The training loop: learning, stop, resume, paced checkpoints, divergence, early stopping."""

import pytest

from conftest import StopAfter, tiny_config
from core.config import ConfigError
from core.models.checkpoint import load_checkpoint
from core.models.resnet import build_model, model_from_checkpoint
from core.runs.life import Reporter, TrainingError, prepare_run
from core.train.loop import fit


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


def test_frozen_backbone_trains_only_the_head():
    model = build_model("resnet18", 2, freeze_backbone=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"]





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
