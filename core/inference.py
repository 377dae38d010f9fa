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

from .model import model_from_checkpoint
from .config import TrainConfig
from .decide import calibrate
from .device import autocast, autocast_dtype
from .images import load_array
from .transforms import Normalizer


@torch.inference_mode()
def forward_probs(model, x_u8: torch.Tensor, normalizer: Normalizer, amp: torch.dtype | None,
                  tta: bool = False) -> torch.Tensor:
    """Softmax probabilities (float32, on the model's device) of a NxHxWx3 uint8 batch. TTA averages the
    image with its horizontal and vertical flips (the views a flip-augmented model has learned)."""
    model.eval()
    x = normalizer(x_u8)
    with autocast(x.device, amp):
        probs = model(x).float().softmax(1)
        if tta:
            probs = (probs + model(x.flip(3)).float().softmax(1) + model(x.flip(2)).float().softmax(1)) / 3
    return probs


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
        self.tta = cfg.tta
        self.temperature = temperature
        self.model = model.to(self.device).to(memory_format=torch.channels_last).eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: torch.device | None = None,
                        temperature: float = 1.0) -> "Classifier":
        model, meta = model_from_checkpoint(path)
        return cls(model, meta, device, temperature)

    def probs(self, x_u8: torch.Tensor) -> np.ndarray:
        """N x classes float64 probabilities of a NxHxWx3 uint8 batch."""
        p = forward_probs(self.model, x_u8.to(self.device), self.normalizer, self.amp, self.tta)
        return calibrate(p.cpu().numpy().astype(np.float64), self.temperature)

    def features_and_probs(self, x_u8: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(N x F float32 penultimate-layer features, N x classes probabilities) of a uint8 batch in one pass.
        The features are the final layer's input (after pooling) for the image as given, without TTA: what the
        decision is made from, for neighbours, near-duplicates and the embedding map; the probabilities are
        `probs`' (TTA and temperature included)."""
        seen = []

        def first_view(module, args):
            if not seen:  # TTA's flipped views pass here too; the features are the image's own
                seen.append(args[0].float().cpu().numpy())

        hook = self.model.fc.register_forward_pre_hook(first_view)
        try:
            probs = self.probs(x_u8)
        finally:
            hook.remove()
        return seen[0], probs

    def features(self, x_u8: torch.Tensor) -> np.ndarray:
        return self.features_and_probs(x_u8)[0]

    def probs_of_batches(self, batches) -> np.ndarray:
        """Probabilities of uint8 batches (an iterable), concatenated in order."""
        out = [self.probs(x) for x in batches]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), dtype=np.float64)

    def image(self, source) -> np.ndarray:
        """The HxWx3 uint8 input the model sees for a path, bytes or PIL image (ImageLoadError if unusable)."""
        return load_array(source, self.hw)
