"""Prediction with a run's best checkpoint: loaded once, exactly the evaluation preprocessing."""
from __future__ import annotations

import copy
import os
import threading
from pathlib import Path

import numpy as np
import torch

from .checkpoint import model_from_checkpoint
from .explain import heatmap, overlay
from .images import ImageLoadError
from .storage import Workspace
from .transforms import Normalizer, build_eval_transform


class Predictor:
    """Thread-safe: plain predictions share one model (no_grad forward passes do not mutate it);
    Grad-CAM runs on a separate copy under a lock, because it hooks into the model."""

    def __init__(self, checkpoint: str | Path):
        self.checkpoint = Path(checkpoint)
        self.model, self.meta = model_from_checkpoint(self.checkpoint)
        self.classes: list[str] = self.meta["classes"]
        self.hw = tuple(self.meta["input_hw"])
        self.normalizer = Normalizer(self.meta["normalization"]["mean"], self.meta["normalization"]["std"])
        self.transform = build_eval_transform(self.hw, self.normalizer)
        self.model.to(memory_format=torch.channels_last)
        # The same precision as evaluation (bf16 autocast on CPUs that support it): the predictor's
        # probabilities match the evaluation's for the same file, and it is about twice as fast.
        from .config import TrainConfig
        from .train import autocast_dtype
        self.amp = autocast_dtype(torch.device("cpu"), TrainConfig.from_dict(self.meta["config"]).amp)
        self._cam_model = copy.deepcopy(self.model)  # Grad-CAM stays in fp32: gradients need the precision
        self._cam_lock = threading.Lock()

    @torch.inference_mode()
    def _probs(self, x: torch.Tensor) -> np.ndarray:
        with torch.autocast("cpu", dtype=self.amp or torch.float32, enabled=self.amp is not None):
            logits = self.model(x)
        return logits.float().softmax(1).numpy().astype(np.float64)

    def predict(self, sources, top_k: int = 3, batch_size: int = 32) -> list[dict]:
        """One result per source (path, bytes, or PIL image): {"path", "top": [{"label", "prob"}],
        "probs": {label: p}} or {"path", "error"} for anything that is not a usable image."""
        if not isinstance(sources, (list, tuple)):
            sources = [sources]
        results: list[dict | None] = [None] * len(sources)
        good, tensors = [], []
        for i, src in enumerate(sources):
            name = str(src) if isinstance(src, (str, os.PathLike)) else getattr(src, "name", f"image {i + 1}")
            try:
                x, _ = self.transform(src)
                good.append((i, name))
                tensors.append(x)
            except ImageLoadError as exc:
                results[i] = {"path": name, "error": str(exc)}
        k = max(1, min(top_k, len(self.classes)))
        for start in range(0, len(tensors), batch_size):
            probs = self._probs(torch.cat(tensors[start:start + batch_size]))
            for (i, name), p in zip(good[start:start + batch_size], probs):
                order = np.argsort(-p)[:k]
                results[i] = {"path": name,
                              "top": [{"label": self.classes[j], "prob": float(p[j])} for j in order],
                              "probs": {c: float(p[j]) for j, c in enumerate(self.classes)}}
        return results  # type: ignore[return-value]

    def explain(self, source, target: int | str | None = None, method: str = "gradcam") -> dict:
        """Grad-CAM for one image: {"rgb", "heatmap", "overlay", "target", "label", "prob"}."""
        x, rgb = self.transform(source)
        p = self._probs(x)[0]
        if target is None:
            target = int(p.argmax())
        elif isinstance(target, str):
            target = self.classes.index(target)
        with self._cam_lock:
            heat = heatmap(self._cam_model, x, target, method)
        return {"rgb": rgb, "heatmap": heat, "overlay": overlay(rgb, heat), "target": target,
                "label": self.classes[target], "prob": float(p[target])}


_PREDICTORS: dict[tuple, Predictor] = {}
_PREDICTORS_LOCK = threading.Lock()


def get_predictor(ws: Workspace, run_id: str) -> Predictor:
    """A cached Predictor for a run's best checkpoint (reloaded when the file changes)."""
    path = ws.run(run_id).best_path
    if not path.exists():
        raise FileNotFoundError(f"run {run_id} has no best checkpoint yet (no epoch finished)")
    key = (str(path), path.stat().st_mtime_ns)
    with _PREDICTORS_LOCK:
        if key not in _PREDICTORS:
            for old in [k for k in _PREDICTORS if k[0] == key[0]]:
                del _PREDICTORS[old]
            _PREDICTORS[key] = Predictor(path)
        return _PREDICTORS[key]
