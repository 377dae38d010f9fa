"""Prediction with a run's best checkpoint: loaded once, through the one inference path (core/infer/classifier.py),
so a file gets the probabilities its run's evaluation gave it, TTA and precision included."""
from __future__ import annotations

import copy
import threading
from pathlib import Path

import numpy as np
import torch

from core.decide.rule import Rule
from core.decide.stored import load_rule
from core.deploy.portable import predict_sources, ranked
from core.explain.gradcam import heatmap, overlay
from core.infer.classifier import Classifier
from core.workspace.store import Workspace


class Predictor:
    """Thread-safe: plain predictions share one model (no_grad forward passes do not mutate it);
    Grad-CAM runs on a separate fp32 copy under a lock, because it hooks into the model. Probabilities are
    calibrated with the run's temperature; with a decision rule, each result also says pass / fail / review."""

    def __init__(self, checkpoint: str | Path, temperature: float = 1.0, rule: Rule | None = None):
        self.checkpoint = Path(checkpoint)
        self.classifier = Classifier.from_checkpoint(self.checkpoint, torch.device("cpu"), temperature)
        self.rule = rule
        self.classes: list[str] = self.classifier.classes
        self.hw = self.classifier.hw
        self.meta = self.classifier.meta
        self._cam_model = copy.deepcopy(self.classifier.model)  # Grad-CAM stays in fp32: gradients need it
        self._cam_lock = threading.Lock()

    def image(self, source) -> np.ndarray:
        """The HxWx3 uint8 picture the model sees (ImageLoadError if the source is not a usable image)."""
        return self.classifier.image(source)

    def predict(self, sources, top_k: int = 3, batch_size: int = 32) -> list[dict]:
        """One result per source (path, bytes, or PIL image): {"path", "top": [{"label", "prob"}],
        "probs": {label: p}, "decision" (with a rule)} or {"path", "error"} for anything that is not a usable image."""
        return predict_sources(sources, self.image, lambda x: self.classifier.probs(torch.from_numpy(x)),
                               self.classes, top_k, batch_size, self.rule)

    def explain(self, source, target: int | str | None = None, method: str = "gradcam", top_k: int = 3) -> dict:
        """Grad-CAM for one image: {"rgb", "heatmap", "overlay", "target", "label", "prob", "top", "probs"}."""
        rgb = self.image(source)
        p = self.classifier.probs(torch.from_numpy(rgb[None]))[0]
        if target is None:
            target = int(p.argmax())
        elif isinstance(target, str):
            target = self.classes.index(target)
        x = self.classifier.normalizer(torch.from_numpy(rgb[None]))
        with self._cam_lock:
            heat = heatmap(self._cam_model, x, target, method)
        return {"rgb": rgb, "heatmap": heat, "overlay": overlay(rgb, heat), "target": target,
                "label": self.classes[target], "prob": float(p[target]), **ranked(p, self.classes, top_k)}


def nearest_training(ws: Workspace, run_id: str, sources, k: int = 3) -> list[dict]:
    """For each image (path, bytes or PIL image): the k training images of the run the model finds most alike
    ({"path", "label", "similarity"}: cosine of centred penultimate features), and whether it is unlike anything
    in training (core/explain/features.py); {"error"} for a source that is not a usable image."""
    from core.data.images import ImageLoadError
    from core.explain.features import training_neighbours
    predictor = get_predictor(ws, run_id)
    index = training_neighbours(ws, ws.run(run_id))
    out: list[dict | None] = []
    arrays = []
    for s in sources:
        try:
            arrays.append(predictor.image(s))
            out.append(None)
        except ImageLoadError as exc:
            out.append({"error": str(exc)})
    found = iter(index.query(predictor.classifier.features(torch.from_numpy(np.stack(arrays))), k)
                 if arrays else [])
    return [r if r is not None else next(found) for r in out]


_PREDICTORS: dict[tuple, Predictor] = {}
_PREDICTORS_LOCK = threading.Lock()


def get_predictor(ws: Workspace, run_id: str) -> Predictor:
    """A cached Predictor for a run's best checkpoint, temperature and rule (reloaded when one of them changes)."""
    run = ws.run(run_id)
    path = run.best_path
    if not path.exists():
        raise FileNotFoundError(f"run {run_id} has no best checkpoint yet (no epoch finished)")
    key = (str(path), path.stat().st_mtime_ns,
           *(p.stat().st_mtime_ns if p.exists() else 0 for p in (run.calibration_path, run.rule_path)))
    with _PREDICTORS_LOCK:
        if key not in _PREDICTORS:
            for old in [k for k in _PREDICTORS if k[0] == key[0]]:
                del _PREDICTORS[old]
            _PREDICTORS[key] = Predictor(path, run.temperature(), load_rule(run))
        return _PREDICTORS[key]
