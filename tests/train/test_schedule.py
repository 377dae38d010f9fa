"""The learning-rate schedule as a pure function of the step (equal to torch's OneCycleLR), and extensions."""

import pytest
import torch

from core.config import TrainConfig
from core.train.schedule import epoch_batches, lr_at


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
