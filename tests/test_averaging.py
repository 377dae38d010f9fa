"""Weight averaging (cfg.ema): the decay, the average itself, and how training keeps and restores it."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from conftest import tiny_config
from core.averaging import EMA_WARMUP, WeightAverage, ema_decay
from core.checkpoint import load_checkpoint
from core.runs import Reporter, prepare_run
from core.train import Progress, best_state, build_trainer, fit, kept_weights, restore, update_progress


class StopAfter(Reporter):
    def __init__(self, batches):
        self.batches_left = batches

    def batch(self, epoch, batch, batches, images_per_s):
        self.batches_left -= 1

    def should_stop(self):
        return self.batches_left <= 0


def test_decay_has_the_half_life_in_epochs_and_warms_up():
    spe = 50
    late = 10_000  # past the warm-up
    assert ema_decay(late, spe, 2.0) ** (2.0 * spe) == pytest.approx(0.5)
    assert ema_decay(late, 500, 2.0) > ema_decay(late, spe, 2.0)  # more steps per epoch: each step counts less
    assert ema_decay(0, spe, 2.0) == pytest.approx(1 / EMA_WARMUP)  # the random start fades fast
    assert ema_decay(5, spe, 2.0) < ema_decay(50, spe, 2.0) < ema_decay(late, spe, 2.0)


def test_average_follows_the_weights_by_the_decay_and_copies_counters():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    avg = WeightAverage(model, steps_per_epoch=10, half_life_epochs=1.0)
    start = avg.state_dict()["0.weight"].clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)          # what an optimizer step does: in place
        model[1].num_batches_tracked += 7
    avg.update(step=100)
    d = ema_decay(100, 10, 1.0)
    assert torch.allclose(avg.state_dict()["0.weight"], d * start + (1 - d) * model[0].weight)
    assert int(avg.state_dict()["1.num_batches_tracked"]) == 7
    assert not avg.model.training and not any(p.requires_grad for p in avg.model.parameters())
    assert avg.state_dict()["0.weight"].data_ptr() != model[0].weight.data_ptr()  # a copy, not the weights


def test_the_epoch_keeps_the_weights_that_validate_better():
    assert kept_weights({"val_acc": 0.8, "val_loss": 0.5}) == ("trained", 0.8, 0.5)
    assert kept_weights({"val_acc": 0.8, "val_loss": 0.5, "avg_val_acc": 0.85, "avg_val_loss": 0.6})[0] == "averaged"
    assert kept_weights({"val_acc": 0.8, "val_loss": 0.5, "avg_val_acc": 0.8, "avg_val_loss": 0.4})[0] == "averaged"
    assert kept_weights({"val_acc": 0.8, "val_loss": 0.5, "avg_val_acc": 0.75, "avg_val_loss": 0.1})[0] == "trained"
    progress, cfg = Progress(), tiny_config("x")
    assert update_progress(progress, {"epoch": 1, "val_acc": 0.7, "val_loss": 0.6}, cfg)
    # The averaged weights of epoch 2 beat epoch 1, its trained weights do not: epoch 2 is the best, averaged.
    assert update_progress(progress, {"epoch": 2, "val_acc": 0.65, "val_loss": 0.7,
                                      "avg_val_acc": 0.75, "avg_val_loss": 0.55}, cfg)
    assert progress.best == {**progress.best, "epoch": 2, "weights": "averaged", "val_acc": 0.75}
    model = nn.Linear(2, 2)
    t = SimpleNamespace(model=model, average=WeightAverage(model, 1, 1.0))
    assert best_state(t, progress)["weight"].data_ptr() == t.average.state_dict()["weight"].data_ptr()


def test_training_with_averaging_validates_both_saves_the_average_and_resumes_it(dot_folder, workspace):
    run = prepare_run(workspace, tiny_config(dot_folder, epochs=3, ema=True))
    steps = -(-len(run.split()["train"]) // 16)
    assert fit(workspace, run, StopAfter(2 * steps + 1))["status"] == "stopped"
    hist = run.history()
    assert [h["epoch"] for h in hist] == [1, 2]
    assert all(0 <= h["avg_val_acc"] <= 1 and h["avg_val_loss"] > 0 for h in hist)
    _, best_meta, _ = load_checkpoint(run.best_path)
    assert best_meta["best"]["weights"] == kept_weights(hist[best_meta["epoch"] - 1])[0]
    trained, meta, payload = load_checkpoint(run.last_path)
    assert set(payload["averaged"]) == set(trained)
    assert any(not torch.equal(payload["averaged"][k], trained[k]) for k in trained if trained[k].is_floating_point())

    t = build_trainer(workspace, run, run.config(), Reporter())  # resuming continues the saved average
    restore(run, t, Reporter())
    assert all(torch.equal(v, payload["averaged"][k]) for k, v in t.average.state_dict().items())
    assert fit(workspace, run, resume=True)["status"] == "done"
    assert [h["epoch"] for h in run.history()] == [1, 2, 3] and "avg_val_acc" in run.history()[2]


def test_best_checkpoint_holds_the_averaged_weights_when_they_win(dot_folder, workspace, monkeypatch):
    import core.train as train_mod
    # Every epoch's averaged weights made to "validate" best, each better than the last: best.pt must then be the
    # final epoch's average, the one last.pt carries beside the trained weights.
    monkeypatch.setattr(train_mod, "kept_weights", lambda row: ("averaged", row["epoch"] / 10, 0.0))
    run = prepare_run(workspace, tiny_config(dot_folder, epochs=2, ema=True))
    fit(workspace, run)
    best, best_meta, _ = load_checkpoint(run.best_path)
    trained, _, payload = load_checkpoint(run.last_path)
    assert best_meta["epoch"] == 2 and best_meta["best"]["weights"] == "averaged"
    assert run.evaluation()["checkpoint_weights"] == "averaged"  # what the Evaluate page says
    assert all(torch.equal(best[k], payload["averaged"][k]) for k in best)
    assert any(not torch.equal(best[k], trained[k]) for k in best if best[k].is_floating_point())


def test_estimate_counts_the_second_validation_pass():
    from core.estimate import EVAL_COST, run_seconds
    counts = {"train": 100, "val": 40, "test": 30}
    off = run_seconds(tiny_config("x", epochs=5), counts, 50.0, 0.0)
    on = run_seconds(tiny_config("x", epochs=5, ema=True), counts, 50.0, 0.0)
    assert on - off == pytest.approx(5 * 40 * EVAL_COST / 50.0)


def test_curves_show_the_averaged_weights_validation_when_there_is_one():
    from pages._ui import curves_figure
    plain = [{"epoch": 1, "train_acc": 0.5, "val_acc": 0.6}]
    averaged = [{**plain[0], "avg_val_acc": 0.65}]
    assert [t.name for t in curves_figure(plain, "acc", "A").data] == ["train", "validation"]
    fig = curves_figure(averaged, "acc", "A")
    assert fig.data[-1].name == "validation, averaged weights" and list(fig.data[-1].y) == [0.65]
