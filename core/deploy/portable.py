"""Prediction from an exported ONNX file, without PyTorch: onnxruntime, numpy and Pillow only.

For the line-side PC: the file's model card (core/deploy/export.py) says the classes, the input size and whether the
flips are in the graph; images are opened and resized exactly as the studio does (core/data/images.py), so the
probabilities are the studio's fp32 ones. Importing this module never imports torch.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from core.data.images import ImageLoadError, load_array
from core.decide.rule import Rule
from core.errors import UserError

CARD_KEY = "model_card"  # the metadata key core/deploy/export.py writes


class PortableModelError(UserError):
    """The file is not a model exported by the studio, or onnxruntime cannot run it."""


class OnnxPredictor:
    def __init__(self, path: str | Path):
        try:
            import onnxruntime as ort
        except ImportError:
            raise PortableModelError("predicting from an ONNX file needs onnxruntime: pip install onnxruntime") from None
        path = Path(path).expanduser()
        if not path.is_file():
            raise PortableModelError(f"model file {path} not found")
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types for unreadable or invalid graphs
            raise PortableModelError(f"{path.name} is not a usable ONNX model ({str(exc).splitlines()[0][:160]})") from None
        card = self.session.get_modelmeta().custom_metadata_map.get(CARD_KEY)
        if card is None:
            raise PortableModelError(f"{path.name} has no studio model card: export it with `python -m core export`")
        self.card = json.loads(card)
        self.classes: list[str] = self.card["classes"]
        self.hw = (self.card["input"]["height"], self.card["input"]["width"])
        self.rule = Rule.from_dict(self.card["rule"]) if self.card.get("rule") else None

    def probs(self, images: np.ndarray) -> np.ndarray:
        """N x classes probabilities of N x H x W x 3 uint8 images of the card's size."""
        return self.session.run(None, {"images": images})[0].astype(np.float64)

    def predict(self, sources, top_k: int = 3, batch_size: int = 32) -> list[dict]:
        """The same results as core.predict.Predictor.predict."""
        return predict_sources(sources, lambda src: load_array(src, self.hw), self.probs, self.classes, top_k,
                               batch_size, self.rule)


def ranked(p: np.ndarray, classes: list[str], k: int) -> dict:
    """{"top": the k likeliest [{"label", "prob"}], "probs": {label: p}} of one probability row."""
    order = np.argsort(-p)[:k]
    return {"top": [{"label": classes[j], "prob": float(p[j])} for j in order],
            "probs": {c: float(p[j]) for j, c in enumerate(classes)}}


def predict_sources(sources, image, probs, classes: list[str], k: int = 3, batch_size: int = 32,
                    rule=None) -> list[dict]:
    """One result per source (path, bytes, or PIL image): {"path", "top", "probs"} (and "decision" with a decision
    rule), or {"path", "error"} for anything that is not a usable image. `image(source)` gives the model's uint8
    picture, `probs(N x H x W x 3 uint8 array)` the probability rows; both predictors (torch and ONNX) share this
    loop."""
    if not isinstance(sources, (list, tuple)):
        sources = [sources]
    results: list[dict | None] = [None] * len(sources)
    good, arrays = [], []
    for i, src in enumerate(sources):
        name = str(src) if isinstance(src, (str, os.PathLike)) else getattr(src, "name", f"image {i + 1}")
        try:
            arrays.append(image(src))
            good.append((i, name))
        except ImageLoadError as exc:
            results[i] = {"path": name, "error": str(exc)}
    k = max(1, min(k, len(classes)))
    for start in range(0, len(arrays), batch_size):
        batch = probs(np.stack(arrays[start:start + batch_size]))
        decided = rule.decisions(batch) if rule is not None else [None] * len(batch)
        for (i, name), p, d in zip(good[start:start + batch_size], batch, decided):
            results[i] = {"path": name, **ranked(p, classes, k), **({"decision": d} if d else {})}
    return results  # type: ignore[return-value]
