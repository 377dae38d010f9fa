"""The training loss: cross-entropy, and for ordered classes (grades such as OK < minor < major < critical) an
ordinal term on top.

Cross-entropy charges a "critical" part called "OK" no more than one called "major". With `ordinal` on, the loss
adds the squared earth mover's distance between the predicted and the true grade distributions (Hou et al. 2017,
"Squared Earth Mover's Distance-based loss for training deep neural networks"): the squared gaps between the two
cumulative distributions, which grows with how many grades the predicted mass sits from the truth. The model and
its output stay a softmax over the classes, so evaluation, calibration, Grad-CAM and export are unchanged. The
grade order is the classes' order, that is their sorted names: name the folders so that they sort by grade
("1_ok", "2_minor", ...). Targets may be class indices or N x classes distributions (mixup).
"""
from __future__ import annotations

import torch
from torch import nn


class OrdinalLoss(nn.Module):
    """Cross-entropy plus `weight` x squared EMD between the cumulative predicted and target distributions."""

    def __init__(self, ce: nn.CrossEntropyLoss, weight: float = 1.0):
        super().__init__()
        self.ce, self.weight = ce, weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = logits.float().softmax(1)
        soft = target if target.ndim == 2 else nn.functional.one_hot(target, logits.shape[1]).to(probs.dtype)
        # The last cumulative value is 1 on both sides: leave it out.
        gap = probs.cumsum(1)[:, :-1] - soft.cumsum(1)[:, :-1]
        return self.ce(logits, target) + self.weight * gap.pow(2).sum(1).mean()


def build_criterion(ordinal: bool, class_weight: torch.Tensor | None = None,
                    label_smoothing: float = 0.0) -> nn.Module:
    ce = nn.CrossEntropyLoss(weight=class_weight, label_smoothing=label_smoothing)
    return OrdinalLoss(ce) if ordinal else ce

