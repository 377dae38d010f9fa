"""Weight averaging: an exponential moving average (EMA) of the weights, kept beside the trained ones.

Why: trained from scratch on a small set, the weights after any one step carry that step's noise, and the
best-validation checkpoint picks one noisy point of the trajectory. An average over the last steps (timm's
ModelEmaV3, airbench's EMA) validates steadier. The averaged copy is validated every epoch beside the trained
weights and the epoch keeps whichever validates better (train.update_progress), so switching it on never
selects a checkpoint that is worse on validation; best.pt's metadata says which weights it holds.

The decay is a pure function of the step and the config (`ema_decay`), like the learning rate: nothing about it
is restored from a checkpoint except the averaged weights themselves (last.pt's "averaged").
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

EMA_WARMUP = 10  # timm's warm-up: the decay is at most (1 + step) / (10 + step), so the random start fades fast


def ema_decay(step: int, steps_per_epoch: int, half_life_epochs: float) -> float:
    """The per-step decay at optimizer step `step` (0-based): the weights of `half_life_epochs` epochs ago count
    half as much as the newest. A half-life in epochs, not a raw decay, so one setting means the same on 500
    images as on 50,000 (timm's ImageNet default 0.9998 is a half-life of about 1.4 epochs at batch 512)."""
    base = 0.5 ** (1.0 / max(half_life_epochs * steps_per_epoch, 1.0))
    return min(base, (1 + step) / (EMA_WARMUP + step))


class WeightAverage:
    """An averaged copy of a model (eval mode, no gradients), updated after every optimizer step.

    Floating-point parameters and buffers (batch norm's running statistics) are averaged; integer buffers
    (num_batches_tracked) are copied."""

    def __init__(self, model: nn.Module, steps_per_epoch: int, half_life_epochs: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.steps_per_epoch = steps_per_epoch
        self.half_life_epochs = half_life_epochs
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
        weight = 1.0 - ema_decay(step, self.steps_per_epoch, self.half_life_epochs)
        torch._foreach_lerp_(self._avg, self._src, weight)
        for a, s in self._other:
            a.copy_(s)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)  # copies in place: the bound tensors stay the model's own
