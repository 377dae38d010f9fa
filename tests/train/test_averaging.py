"""Weight averaging (cfg.ema, cfg.swa_epochs): the decay, the SWA phase and its rate, the average itself, and how
training keeps and restores it."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from conftest import tiny_config
from core.config import ConfigError
from core.models.checkpoint import load_checkpoint
from core.runs.life import Reporter, prepare_run
from core.train.averaging import (
    EMA_WARMUP,
    WeightAverage,
    average_weight,
    averages_in,
    ema_decay,
    extra_eval_images,
    swa_first_epoch,
)
from core.train.loop import Progress, best_state, build_trainer, fit, kept_weights, restore, update_progress


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
    avg = WeightAverage(model, lambda step: 1.0 - ema_decay(step, 10, 1.0))
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
    t = SimpleNamespace(model=model, average=WeightAverage(model, lambda step: 0.5))
    assert best_state(t, progress)["weight"].data_ptr() == t.average.state_dict()["weight"].data_ptr()


@pytest.mark.slow
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
    import core.train.loop as train_mod
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
    from core.train.estimate import EVAL_COST, run_seconds
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


# ----------------------------------------------------------------------------------------------------
# Stochastic weight averaging (cfg.swa_epochs)


def test_swa_is_the_plain_mean_of_every_step_in_its_last_epochs():
    cfg = tiny_config("x", epochs=5, swa_epochs=2)
    spe = 3
    assert swa_first_epoch(cfg) == 4
    assert [averages_in(cfg, e) for e in range(1, 6)] == [False, False, False, True, True]
    assert [average_weight(cfg, s, spe) for s in range(8, 12)] == [0.0, 1.0, 0.5, pytest.approx(1 / 3)]
    model = nn.Linear(2, 1)
    avg = WeightAverage(model, lambda step: average_weight(cfg, step, spe))
    seen = []
    for step in range(5 * spe):  # what the optimizer does to the weights, step after step
        with torch.no_grad():
            model.weight.copy_(torch.tensor([[float(step), -2.0 * step]]))
        avg.update(step)
        if step >= 3 * spe:
            seen.append(model.weight.clone())
    assert torch.allclose(avg.state_dict()["weight"], torch.stack(seen).mean(0))
    # The phase leaves at least one epoch before it, whatever the epochs: a short run still trains first.
    assert swa_first_epoch(tiny_config("x", epochs=3, swa_epochs=8)) == 2
    assert swa_first_epoch(tiny_config("x", epochs=3)) == 4 and not averages_in(tiny_config("x", epochs=3), 3)


def test_swa_epochs_train_at_a_constant_share_of_the_rate_after_a_full_cycle():
    from core.train.schedule import lr_at
    spe, lr = 10, 2e-3
    cfg = tiny_config("x", epochs=10, schedule="onecycle", lr=lr, swa_epochs=3, swa_lr=0.2)
    rates = [lr_at(cfg, s, spe)[0] for s in range(100)]
    assert rates[70:] == [pytest.approx(0.2 * lr)] * 30
    assert max(rates[:70]) == pytest.approx(lr) and rates[69] < 1e-6  # the cycle warmed up and annealed before
    # The cycle is the one a 7-epoch run without SWA would have had.
    plain = tiny_config("x", epochs=7, schedule="onecycle", lr=lr)
    assert rates[:70] == [pytest.approx(lr_at(plain, s, spe)[0]) for s in range(70)]


def test_swa_and_ema_are_refused_together_and_swa_needs_a_share_of_the_rate():
    with pytest.raises(ConfigError, match="swa_epochs"):
        tiny_config("x", epochs=5, ema=True, swa_epochs=2).validate()
    with pytest.raises(ConfigError, match="swa_lr"):
        tiny_config("x", epochs=5, swa_epochs=2, swa_lr=0.0).validate()


def test_recomputed_batch_norm_statistics_are_the_averaged_weights_own():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    avg = WeightAverage(model, lambda step: 1.0)
    with torch.no_grad():
        avg.model[0].weight.mul_(3.0)  # weights unlike those the trained model's statistics were kept for
    x = torch.randn(64, 3)
    avg.recompute_batch_norm(iter([x[:32], x[32:]]))
    out = avg.model[0](x).detach()
    bn = avg.model[1]
    assert torch.allclose(bn.running_mean, out.mean(0), atol=1e-5)
    # A cumulative mean over the batches (momentum None) of each batch's unbiased variance, as update_bn keeps it.
    assert torch.allclose(bn.running_var, (out[:32].var(0) + out[32:].var(0)) / 2, rtol=1e-4)
    assert not avg.model.training and bn.momentum == 0.1  # left as it was


def test_training_with_swa_validates_the_average_in_its_epochs_only_and_saves_it(dot_folder, workspace):
    run = prepare_run(workspace, tiny_config(dot_folder, epochs=3, swa_epochs=1))
    assert fit(workspace, run)["status"] == "done"
    hist = run.history()
    assert ["avg_val_acc" in h for h in hist] == [False, False, True]
    assert 0 <= hist[2]["avg_val_acc"] <= 1
    trained, meta, payload = load_checkpoint(run.last_path)
    bn_mean = [k for k in trained if k.endswith("running_mean")][0]
    # The average's batch-norm statistics were recomputed for its own weights, not copied from the trained ones.
    assert not torch.equal(payload["averaged"][bn_mean], trained[bn_mean])
    _, best_meta, _ = load_checkpoint(run.best_path)
    assert best_meta["best"]["weights"] == kept_weights(hist[best_meta["epoch"] - 1])[0]


def test_estimate_counts_swa_passes_in_its_epochs_only():
    from core.train.estimate import EVAL_COST, run_seconds
    counts = {"train": 100, "val": 40, "test": 30}
    cfg = tiny_config("x", epochs=5, swa_epochs=2)
    assert extra_eval_images(cfg, 100, 40) == pytest.approx((100 + 40) * 2 / 5)
    off = run_seconds(tiny_config("x", epochs=5), counts, 50.0, 0.0)
    on = run_seconds(cfg, counts, 50.0, 0.0)
    assert on - off == pytest.approx(2 * (100 + 40) * EVAL_COST / 50.0)


@pytest.mark.slow
def test_a_run_stopped_in_its_swa_phase_resumes_to_the_same_average(dot_folder, workspace, tmp_path):
    from core.workspace.store import Workspace
    cfg = tiny_config(dot_folder, epochs=4, swa_epochs=2)
    other = Workspace(tmp_path / "whole")
    whole = prepare_run(other, cfg)
    assert fit(other, whole)["status"] == "done"
    run = prepare_run(workspace, cfg)
    steps = -(-len(run.split()["train"]) // 16)
    assert fit(workspace, run, StopAfter(3 * steps + 1))["status"] == "stopped"  # inside the phase's 2nd epoch
    assert [h["epoch"] for h in run.history()] == [1, 2, 3]
    assert fit(workspace, run, resume=True)["status"] == "done"
    # The average is a pure function of the steps: rebuilt from its saved mean, it goes on as if never stopped.
    _, _, resumed = load_checkpoint(run.last_path)
    _, _, unbroken = load_checkpoint(whole.last_path)
    for k, v in unbroken["averaged"].items():
        assert torch.allclose(resumed["averaged"][k].float(), v.float(), atol=1e-5), k
