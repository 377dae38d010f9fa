"""The learning-rate schedule as a pure function of the optimizer step, as nanoGPT's get_lr.

Nothing here is restored from a checkpoint: on every start and resume the rate is computed again from the
config and the step, so a resumed or extended run can never disagree with its config (a restored scheduler
state used to: extending a one-cycle run raised "Tried to step 7 times", a cosine run trained on at lr 0).

A run's schedule is one cycle over the epochs after `cfg.schedule_start_epoch` (0 for a new run), up to the SWA
phase where there is one (its epochs train at the constant `cfg.swa_lr` share of the rate: core/train/averaging.py). Extending a
finished run moves that start to the last finished epoch: the added epochs get a cycle of their own (one-cycle
warms up and decays again; cosine decays again from `cfg.lr`; step drops again every `step_size` epochs).
"""
from __future__ import annotations

import math

from core.train.averaging import swa_first_epoch

# torch.optim.lr_scheduler.OneCycleLR's defaults, so recipes tuned with it keep their schedule exactly.
ONECYCLE_PCT_START = 0.3
ONECYCLE_DIV_FACTOR = 25.0           # the cycle starts at lr / 25
ONECYCLE_FINAL_DIV_FACTOR = 1e4      # and ends at (lr / 25) / 1e4
ONECYCLE_MOMENTUM = (0.85, 0.95)     # beta1 (Adam) or momentum (SGD), cycled inversely to the rate


def epoch_batches(n_images: int, batch_size: int) -> int:
    """Optimizer steps in one epoch. A last batch of one image is dropped (BatchNorm cannot train on it)."""
    n = math.ceil(n_images / batch_size)
    if n > 1 and n_images % batch_size == 1:
        n -= 1
    return max(n, 1)


def cycle_first_epoch(cfg) -> int:
    """The first epoch (1-based) of the run's current cycle: 1, or the one after an extension's start."""
    return min(cfg.schedule_start_epoch, cfg.epochs - 1) + 1


def _cos_anneal(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def lr_at(cfg, step: int, steps_per_epoch: int) -> tuple[float, float | None]:
    """(learning rate, momentum or None) for the optimizer step `step` (0-based, counted from the run's first
    epoch). The momentum is set only by one-cycle; None leaves the optimizer's own."""
    start_epoch = cycle_first_epoch(cfg) - 1
    swa_start = swa_first_epoch(cfg) - 1  # the epochs from here on train at a constant rate (cfg.swa_epochs)
    if step >= swa_start * steps_per_epoch:
        return cfg.lr * cfg.swa_lr, None
    total = max(1, (swa_start - start_epoch) * steps_per_epoch)
    t = min(max(step - start_epoch * steps_per_epoch, 0), total - 1)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * t / total)), None
    if cfg.schedule == "step":
        return cfg.lr * cfg.step_gamma ** ((t // steps_per_epoch) // cfg.step_size), None
    if cfg.schedule == "onecycle":
        return _onecycle(cfg.lr, t, total)
    return cfg.lr, None


def _onecycle(max_lr: float, t: int, total: int) -> tuple[float, float]:
    initial = max_lr / ONECYCLE_DIV_FACTOR
    final = initial / ONECYCLE_FINAL_DIV_FACTOR
    low_m, high_m = ONECYCLE_MOMENTUM
    warm_end = float(ONECYCLE_PCT_START * total) - 1
    if t <= warm_end:
        pct = t / warm_end if warm_end > 0 else 1.0
        return _cos_anneal(initial, max_lr, pct), _cos_anneal(high_m, low_m, pct)
    pct = (t - warm_end) / max(total - 1 - warm_end, 1e-12)
    return _cos_anneal(max_lr, final, pct), _cos_anneal(low_m, high_m, pct)


def apply_lr(optimizer, lr: float, momentum: float | None) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        if momentum is None:
            continue
        if "betas" in group:
            group["betas"] = (momentum, *group["betas"][1:])
        elif "momentum" in group:
            group["momentum"] = momentum


# ----------------------------------------------------------------------------------------------------
# Progressive resizing: the training image size as a pure function of the epoch

PROGRESSIVE_FULL_AT = 0.75  # fraction of the epochs by which training reaches the full size
SIZE_STEP = 16              # sizes move in steps of 16 px (whole feature-map cells after ResNet's stride 32 / 2)
# Never below 32 px: at 16 px ResNet's layer3 hands layer4's stride-2 convolution a 1x1 map, where bf16 autocast on
# a CPU (torch 2.15, oneDNN) returned NaN weight gradients in 1 to 10% of steps (fp32: none in 300): a tiny-image
# run then failed as "diverged" by chance.
MIN_PROGRESSIVE_SIDE = 32


def train_hw_at(cfg, epoch: int) -> tuple[int, int]:
    """(height, width) training batches are resized to in `epoch` (1-based): `cfg.progressive_start` of the full
    size in the first epoch, growing linearly to the full size at PROGRESSIVE_FULL_AT of the epochs (counted from
    `cfg.schedule_start_epoch`, like the learning rate), the full size after that and whenever it is off."""
    h, w = cfg.input_hw
    start = cfg.progressive_start
    if start >= 1.0:
        return h, w
    first = cycle_first_epoch(cfg)
    full_at = first + max(1, round(PROGRESSIVE_FULL_AT * (cfg.epochs - first + 1))) - 1
    pct = 1.0 if epoch >= full_at else max(0.0, (epoch - first) / max(full_at - first, 1))
    scale = start + (1.0 - start) * pct

    def side(n: int) -> int:
        return min(n, max(MIN_PROGRESSIVE_SIDE, int(round(n * scale / SIZE_STEP)) * SIZE_STEP))
    return side(h), side(w)


def mean_pixel_fraction(cfg) -> float:
    """The training pixels of the run's epochs relative to training every epoch at the full size (for estimates)."""
    h, w = cfg.input_hw
    epochs = range(cycle_first_epoch(cfg), cfg.epochs + 1)
    return sum(eh * ew for eh, ew in (train_hw_at(cfg, e) for e in epochs)) / (h * w * len(epochs))
