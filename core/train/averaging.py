"""Weight averaging, kept beside the trained weights: an exponential moving average (EMA, cfg.ema) or stochastic
weight averaging over the run's last epochs (SWA, cfg.swa_epochs).

Why: trained from scratch on a small set, the weights after any one step carry that step's noise, and the
best-validation checkpoint picks one noisy point of the trajectory. An average over the last steps (timm's
ModelEmaV3, airbench's EMA) validates steadier. SWA (Izmailov et al. 2018, torch.optim.swa_utils) goes further:
its epochs train at a constant, not annealed, learning rate (schedule.lr_at), so that the weights wander around a
wide minimum, and their plain mean lands nearer its centre than any one of them. The averaged copy is validated
beside the trained weights and the epoch keeps whichever validates better (train.update_progress), so the average
itself never selects a checkpoint that is worse on validation (EMA leaves training as it is; SWA's constant-rate
phase does not: it shortens the cycle before it); best.pt's metadata says which weights it holds.
Measured (bench/RESULTS.md): EMA +0.05 on ELPV, +1.55 on digits; SWA -0.56 on ELPV (its phase shortens the
one-cycle, and its mean never held the best epoch), +1.36 on digits. EMA is the Train page's option; SWA a config
field for experiments.

An average's share of each step is a pure function of the step and the config (`average_weight`), like the
learning rate: nothing about it is restored from a checkpoint except the averaged weights themselves (last.pt's
"averaged").
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn

EMA_WARMUP = 10  # timm's warm-up: the decay is at most (1 + step) / (10 + step), so the random start fades fast


def ema_decay(step: int, steps_per_epoch: int, half_life_epochs: float) -> float:
    """The per-step decay at optimizer step `step` (0-based): the weights of `half_life_epochs` epochs ago count
    half as much as the newest. A half-life in epochs, not a raw decay, so one setting means the same on 500
    images as on 50,000 (timm's ImageNet default 0.9998 is a half-life of about 1.4 epochs at batch 512)."""
    base = 0.5 ** (1.0 / max(half_life_epochs * steps_per_epoch, 1.0))
    return min(base, (1 + step) / (EMA_WARMUP + step))


def swa_first_epoch(cfg) -> int:
    """The first epoch (1-based) of the SWA phase: the last `cfg.swa_epochs` epochs, at least one epoch before
    them; past the last epoch when SWA is off."""
    if not cfg.swa_epochs:
        return cfg.epochs + 1
    return cfg.epochs - min(cfg.swa_epochs, cfg.epochs - 1) + 1


def average_weight(cfg, step: int, steps_per_epoch: int) -> float:
    """The share of the weights after optimizer step `step` (0-based) in the new average: the EMA's 1 - decay, or
    SWA's 1 / (n + 1) for the n-th step of its phase (a plain mean of every step's weights since it began) and 0
    before it."""
    if cfg.ema:
        return 1.0 - ema_decay(step, steps_per_epoch, cfg.ema_half_life)
    n = step - (swa_first_epoch(cfg) - 1) * steps_per_epoch
    return 1.0 / (n + 1) if n >= 0 else 0.0


def averages_in(cfg, epoch: int) -> bool:
    """Whether `epoch` (1-based) has averaged weights of its own to validate: every epoch with EMA, the SWA phase's
    epochs with SWA (before it the average holds nothing yet)."""
    return bool(cfg.ema) or epoch >= swa_first_epoch(cfg)


def extra_eval_images(cfg, n_train: int, n_val: int) -> float:
    """Forward passes an epoch adds for averaging, on average over the run, in images (for the estimates): EMA
    validates its weights every epoch; SWA does in its epochs, after a pass over the training part that
    recomputes the averaged weights' batch-norm statistics."""
    if cfg.ema:
        return float(n_val)
    swa = cfg.epochs + 1 - swa_first_epoch(cfg)
    return (n_val + n_train) * swa / max(cfg.epochs, 1)


class WeightAverage:
    """An averaged copy of a model (eval mode, no gradients), updated after every optimizer step with the share
    `weight_at(step)` of the trained weights (0: left as it is).

    Floating-point parameters and buffers (batch norm's running statistics) are averaged; integer buffers
    (num_batches_tracked) are copied."""

    def __init__(self, model: nn.Module, weight_at: Callable[[int], float]):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.weight_at = weight_at
        self._bind(model)

    def _bind(self, model: nn.Module) -> None:
        # state_dict() tensors share storage with the live parameters and buffers: read at every update.
        src, avg = model.state_dict(), self.model.state_dict()
        self._avg = [avg[k] for k, v in src.items() if v.is_floating_point()]
        self._src = [v for v in src.values() if v.is_floating_point()]
        self._other = [(avg[k], v) for k, v in src.items() if not v.is_floating_point()]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the trained weights after optimizer step `step` into the average."""
        weight = self.weight_at(step)
        if weight <= 0:
            return
        torch._foreach_lerp_(self._avg, self._src, weight)
        for a, s in self._other:
            a.copy_(s)

    @torch.no_grad()
    def recompute_batch_norm(self, batches) -> None:
        """The averaged weights' own batch-norm statistics, from a pass over `batches` (normalized inputs): a mean
        of the statistics the trained weights kept along the way does not describe the averaged weights'
        activations (SWA's step torch.optim.swa_utils.update_bn, which this calls)."""
        torch.optim.swa_utils.update_bn(batches, self.model)
        self.model.eval()

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)  # copies in place: the bound tensors stay the model's own


def build_average(cfg, model: nn.Module, steps_per_epoch: int) -> WeightAverage | None:
    """The run's weight average (EMA or SWA), or None when neither is on."""
    if not (cfg.ema or cfg.swa_epochs):
        return None
    return WeightAverage(model, lambda step: average_weight(cfg, step, steps_per_epoch))
