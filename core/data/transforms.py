"""Preprocessing and augmentation on batched tensors.

The decoded cache holds NxHxWx3 uint8 images. A batch becomes the model's input in one way only:
`to_unit` (uint8 NHWC -> float NCHW in [0, 1], channels_last memory, free because the cache is already HWC),
then the augmentation in training (one affine resampling for the whole batch), then `Normalizer.normalize`.
Nothing is decoded or transformed image by image during an epoch.

The one evaluation transform is images.load_array (open, upright RGB, the cache's resize) followed by the
Normalizer: evaluation, prediction and Grad-CAM all go through it (core/infer/classifier.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def to_unit(batch_u8: torch.Tensor) -> torch.Tensor:
    """NxHxWx3 uint8 -> float Nx3xHxW in [0, 1], channels_last memory (a view of the HWC layout)."""
    return batch_u8.permute(0, 3, 1, 2).float().div_(255.0)


@dataclass
class Normalizer:
    mean: list[float]
    std: list[float]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Float Nx3xHxW in [0, 1] -> normalized, channels_last memory."""
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous(memory_format=torch.channels_last)

    def __call__(self, batch_u8: torch.Tensor) -> torch.Tensor:
        """NxHxWx3 uint8 (any device) -> the model's input: normalized float Nx3xHxW, channels_last."""
        return self.normalize(to_unit(batch_u8))


@dataclass
class AugmentSpec:
    hflip: bool = False
    vflip: bool = False
    rotation: float = 0.0
    rot90: bool = False
    crop_scale_min: float = 1.0
    color_jitter: float = 0.0

    @classmethod
    def from_config(cls, cfg) -> "AugmentSpec":
        return cls(cfg.hflip, cfg.vflip, cfg.rotation, cfg.rot90, cfg.crop_scale_min, cfg.color_jitter)

    @property
    def geometric(self) -> bool:
        return self.rotation > 0 or self.crop_scale_min < 1.0

    @property
    def active(self) -> bool:
        return self.hflip or self.vflip or self.rot90 or self.geometric or self.color_jitter > 0


def build_train_augment(spec: AugmentSpec):
    """A function (x in [0,1], float Nx3xHxW, generator) -> augmented x of the same shape."""
    def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if not spec.active:
            return x
        n, dev = x.shape[0], x.device

        def rand(*shape):
            return torch.rand(*shape, generator=gen).to(dev)

        if spec.geometric:
            x = _affine(x, spec, rand)
        else:
            # Exact pixel moves, no resampling: flips and quarter turns.
            if spec.hflip:
                m = rand(n) < 0.5
                x = torch.where(m.view(-1, 1, 1, 1), x.flip(3), x)
            if spec.vflip:
                m = rand(n) < 0.5
                x = torch.where(m.view(-1, 1, 1, 1), x.flip(2), x)
            if spec.rot90 and x.shape[2] == x.shape[3]:
                k = (rand(n) * 4).long().clamp_(0, 3)
                out = x.clone()
                for q in (1, 2, 3):
                    sel = (k == q).nonzero().flatten()
                    if len(sel):
                        out[sel] = torch.rot90(x[sel], q, dims=(2, 3))
                x = out
        if spec.color_jitter > 0:
            x = _color_jitter(x, spec.color_jitter, rand)
        return x.contiguous(memory_format=torch.channels_last)
    return augment


def _affine(x, spec: AugmentSpec, rand):
    """Flip, rotation and random-resized-crop composed into one sampling grid per image."""
    n, dev = x.shape[0], x.device
    angle = (rand(n) * 2 - 1) * spec.rotation
    if spec.rot90:
        angle = angle + (rand(n) * 4).floor().clamp(0, 3) * 90.0
    theta_rad = angle * math.pi / 180.0
    if spec.crop_scale_min < 1.0:
        area = spec.crop_scale_min + rand(n) * (1.0 - spec.crop_scale_min)
        log_ratio = (rand(n) * 2 - 1) * math.log(4 / 3)
        ratio = torch.exp(log_ratio)
        cw = torch.sqrt(area * ratio).clamp(max=1.0)
        ch = torch.sqrt(area / ratio).clamp(max=1.0)
        tx = (rand(n) * 2 - 1) * (1 - cw)
        ty = (rand(n) * 2 - 1) * (1 - ch)
    else:
        cw = ch = torch.ones(n, device=dev)
        tx = ty = torch.zeros(n, device=dev)
    sx = torch.where(rand(n) < 0.5, -1.0, 1.0) if spec.hflip else torch.ones(n, device=dev)
    sy = torch.where(rand(n) < 0.5, -1.0, 1.0) if spec.vflip else torch.ones(n, device=dev)
    cos, sin = torch.cos(theta_rad), torch.sin(theta_rad)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0] = cos * cw * sx
    theta[:, 0, 1] = -sin * ch * sy
    theta[:, 1, 0] = sin * cw * sx
    theta[:, 1, 1] = cos * ch * sy
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _color_jitter(x, strength: float, rand):
    n = x.shape[0]
    b = 1 + (rand(n) * 2 - 1).view(-1, 1, 1, 1) * strength
    c = 1 + (rand(n) * 2 - 1).view(-1, 1, 1, 1) * strength
    s = 1 + (rand(n) * 2 - 1).view(-1, 1, 1, 1) * strength
    x = x * b
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = (x - gray.mean(dim=(2, 3), keepdim=True)) * c + gray.mean(dim=(2, 3), keepdim=True)
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = gray + (x - gray) * s
    return x.clamp_(0, 1)


@dataclass
class MixSpec:
    """Mixup and CutMix (timm's Mixup in batch mode): every training batch is blended with itself reversed, by a
    weight lam ~ Beta(alpha, alpha): the whole images (mixup) or a box cut from one and pasted into the other
    (CutMix; lam then is the area kept). The targets are blended by the same lam. With both on, each batch is one
    or the other, half the time each (timm's switch_prob 0.5)."""
    mixup: float = 0.0   # alpha of mixup's Beta (timm's default 0.8; 0: off)
    cutmix: float = 0.0  # alpha of CutMix's Beta (timm's default 1.0; 0: off)

    @classmethod
    def from_config(cls, cfg) -> "MixSpec":
        return cls(cfg.mixup, cfg.cutmix)

    @property
    def active(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


def build_mix(spec: MixSpec, n_classes: int):
    """None when off; else a function (x float Nx3xHxW, labels N or N x classes targets, generator) -> (mixed x,
    N x classes targets)."""
    if not spec.active:
        return None

    def mix(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
        # One draw from the torch generator seeds numpy's Beta: the mix stays a pure function of the epoch's seed.
        rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        use_cutmix = spec.cutmix > 0 and (spec.mixup <= 0 or rng.random() < 0.5)
        lam = float(rng.beta(spec.cutmix, spec.cutmix) if use_cutmix else rng.beta(spec.mixup, spec.mixup))
        other = x.flip(0)
        if use_cutmix:
            h, w = x.shape[2], x.shape[3]
            cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
            cy, cx = int(rng.integers(h)), int(rng.integers(w))
            y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
            x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
            x = x.clone()
            x[:, :, y0:y1, x0:x1] = other[:, :, y0:y1, x0:x1]
            lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually kept, after clipping at the border
        else:
            x = x * lam + other * (1 - lam)
        one_hot = F.one_hot(y, n_classes).float()
        return x.contiguous(memory_format=torch.channels_last), one_hot * lam + one_hot.flip(0) * (1 - lam)
    return mix
