"""The one inference path: uint8 images -> model input -> batched forward under the run's precision ->
optional test-time augmentation -> softmax probabilities.

Validation during training, the test evaluation, the Predict page and `core predict`, Grad-CAM's top-k,
cross-validation and the label queue all come here, so one image gets one set of probabilities everywhere
(a run trained with TTA used to get TTA in its evaluation only, and predictions 0.21 apart).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from core.config import TrainConfig
from core.data.images import load_array
from core.data.transforms import Normalizer
from core.decide.calibration import calibrate
from core.models.device import autocast, autocast_dtype
from core.models.resnet import forward_features, model_from_checkpoint

TTA_VIEW_SETS = ("flips", "dihedral")
VIEW_COUNTS = {"none": 1, "flips": 3, "dihedral": 8}


def tta_views(x: torch.Tensor, views: str = "flips") -> list[torch.Tensor]:
    """The views of an N x C x H x W batch whose probabilities TTA averages, the image itself first. "flips": the
    image and its horizontal and vertical flips (the views a flip-augmented model has learned); "dihedral": its
    8 flips and quarter turns (cells, tiles, wafers: parts with no up; square inputs only, else the flips)."""
    if views == "dihedral" and x.shape[-1] == x.shape[-2]:
        out: list[torch.Tensor] = []
        for v in [x, x.flip(3)]:  # loops, not a comprehension: the exported TorchScript graph compiles this too
            for k in range(4):
                out.append(torch.rot90(v, k, [2, 3]))
        return out
    return [x, x.flip(3), x.flip(2)]


def run_tta(meta: dict) -> tuple[bool, str]:
    """(TTA on, its views) for a checkpoint: the views chosen on validation at the end of training when the config
    asked for "auto" (meta "tta_views"; "none" when no views beat the image alone), else the config's."""
    cfg = TrainConfig.from_dict(meta["config"])
    chosen = meta.get("tta_views") if cfg.tta_views == "auto" else None
    views = chosen or (cfg.tta_views if cfg.tta_views in TTA_VIEW_SETS else "flips")
    return cfg.tta and views != "none", views if views != "none" else "flips"


@torch.inference_mode()
def forward_probs(model, x_u8: torch.Tensor, normalizer: Normalizer, amp: torch.dtype | None,
                  tta: bool = False, views: str = "flips") -> torch.Tensor:
    """Softmax probabilities (float32, on the model's device) of a NxHxWx3 uint8 batch; with TTA the mean over
    the batch's `views` (tta_views)."""
    return forward_features_and_probs(model, x_u8, normalizer, amp, tta, views)[1]


@torch.inference_mode()
def forward_features_and_probs(model, x_u8: torch.Tensor, normalizer: Normalizer, amp: torch.dtype | None,
                               tta: bool = False, views: str = "flips") -> tuple[torch.Tensor, torch.Tensor]:
    """forward_probs, and the final layer's input for the batch as given (float32): `model.fc(forward_features(...))`
    is the model's own forward, op for op, so the features cost nothing extra. They come back from the call, not
    through a hook: the studio's sessions share one model."""
    model.eval()
    x = normalizer(x_u8)
    inputs = [v.contiguous(memory_format=torch.channels_last) for v in tta_views(x, views)] if tta else [x]
    with autocast(x.device, amp):
        feats = [forward_features(model, v) for v in inputs]
        probs = sum(model.fc(f).float().softmax(1) for f in feats)
    return feats[0].float(), probs / len(inputs)


class Classifier:
    """A trained model with everything its inference needs: classes, input size, normalization, precision,
    TTA, and the run's calibration temperature (1.0: the raw softmax). Plain forward passes do not change the
    model, so threads may share one Classifier."""

    def __init__(self, model, meta: dict, device: torch.device | None = None, temperature: float = 1.0):
        cfg = TrainConfig.from_dict(meta["config"])
        self.meta = meta
        self.classes: list[str] = meta["classes"]
        self.hw: tuple[int, int] = tuple(meta["input_hw"])
        self.normalizer = Normalizer(meta["normalization"]["mean"], meta["normalization"]["std"])
        self.device = device or torch.device("cpu")
        self.amp = autocast_dtype(self.device, cfg.amp)
        self.tta, self.tta_views = run_tta(meta)
        self.temperature = temperature
        self.model = model.to(self.device).to(memory_format=torch.channels_last).eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: torch.device | None = None,
                        temperature: float = 1.0) -> "Classifier":
        model, meta = model_from_checkpoint(path)
        return cls(model, meta, device, temperature)

    def probs(self, x_u8: torch.Tensor) -> np.ndarray:
        """N x classes float64 probabilities of a NxHxWx3 uint8 batch."""
        p = forward_probs(self.model, x_u8.to(self.device), self.normalizer, self.amp, self.tta, self.tta_views)
        return calibrate(p.cpu().numpy().astype(np.float64), self.temperature)

    def features_and_probs(self, x_u8: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(N x F float32 penultimate-layer features, N x classes probabilities) of a uint8 batch in one pass.
        The features are the final layer's input (after pooling) for the image as given, without TTA: what the
        decision is made from, for neighbours, near-duplicates and the embedding map; the probabilities are
        `probs`' (TTA and temperature included), computed with the same operations."""
        feats, p = forward_features_and_probs(self.model, x_u8.to(self.device), self.normalizer, self.amp, self.tta,
                                              self.tta_views)
        return feats.cpu().numpy(), calibrate(p.cpu().numpy().astype(np.float64), self.temperature)

    def features(self, x_u8: torch.Tensor) -> np.ndarray:
        return self.features_and_probs(x_u8)[0]

    def probs_of_batches(self, batches) -> np.ndarray:
        """Probabilities of uint8 batches (an iterable), concatenated in order."""
        out = [self.probs(x) for x in batches]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), dtype=np.float64)

    def image(self, source) -> np.ndarray:
        """The HxWx3 uint8 input the model sees for a path, bytes or PIL image (ImageLoadError if unusable)."""
        return load_array(source, self.hw)
