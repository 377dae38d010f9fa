"""Grad-CAM and friends, through the `grad-cam` package, on an inference copy of a model."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from core.models.resnet import gradcam_layer

METHODS = ("gradcam", "gradcam++", "eigencam", "layercam")


def _cam_class(method: str):
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, LayerCAM
    classes = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "eigencam": EigenCAM, "layercam": LayerCAM}
    if method not in classes:
        raise ValueError(f"unknown explanation method {method!r}; choose one of {', '.join(METHODS)}")
    return classes[method]


def heatmap(model: torch.nn.Module, x: torch.Tensor, target: int, method: str = "gradcam") -> np.ndarray:
    """HxW float32 map in [0, 1] (the input's size) of where `model` looks to score class `target`.
    `model` must be an fp32 inference copy: the CAM registers hooks on it for the duration of the call."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    cam_cls = _cam_class(method)
    x = x.float().contiguous()
    with cam_cls(model=model, target_layers=[gradcam_layer(model)]) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(target))])
    m = np.nan_to_num(np.asarray(maps[0], dtype=np.float32))
    lo, hi = float(m.min()), float(m.max())
    if hi > 1.0 or lo < 0.0:
        m = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    return np.clip(m, 0.0, 1.0)


def overlay(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a jet-coloured heatmap over an HxWx3 uint8 image; returns HxWx3 uint8."""
    from pytorch_grad_cam.utils.image import show_cam_on_image
    if heat.shape != rgb.shape[:2]:
        heat = np.asarray(Image.fromarray((heat * 255).astype(np.uint8)).resize(
            (rgb.shape[1], rgb.shape[0]), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    return show_cam_on_image(rgb.astype(np.float32) / 255.0, heat, use_rgb=True, image_weight=1 - alpha)
