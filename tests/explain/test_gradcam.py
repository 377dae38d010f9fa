"""Grad-CAM: maps in range and image-sized, hotter on the deciding region, the prediction model untouched."""
import numpy as np
import pytest
from PIL import Image

from conftest import make_dot_image, plant_bright_spot_detector
from core.deploy.predict import Predictor
from core.explain.gradcam import METHODS


@pytest.mark.parametrize("method", METHODS)
def test_gradcam_maps_are_unit_range_and_image_sized(trained, method):
    pred = Predictor(trained["run"].best_path)
    rng = np.random.default_rng(3)
    img, _ = make_dot_image(rng, trained["size"], dot=True)
    out = pred.explain(Image.fromarray(img), method=method)
    assert out["heatmap"].shape == (trained["size"],) * 2
    assert out["heatmap"].min() >= 0 and out["heatmap"].max() <= 1
    assert out["overlay"].shape == (trained["size"], trained["size"], 3) and out["overlay"].dtype == np.uint8


def test_gradcam_is_hotter_on_the_deciding_region(trained, tmp_path):
    """On a model known to decide by the bright square (planted: conftest.plant_bright_spot_detector), not on
    the trained one, whose maps depend on how far a few epochs took it on this CPU."""
    import shutil

    from core.workspace.store import Workspace
    shutil.copytree(trained["ws"].root, tmp_path / "ws")
    ws = Workspace(tmp_path / "ws")
    run = ws.run(trained["run"].id)
    plant_bright_spot_detector(ws, run, "dot", low=110, high=240)  # noise is at most 110, the square 240
    pred = Predictor(run.best_path)
    rng = np.random.default_rng(11)
    inside, outside = [], []
    for _ in range(12):
        img, (y, x, s) = make_dot_image(rng, trained["size"], dot=True)
        heat = pred.explain(Image.fromarray(img), target="dot")["heatmap"]
        mask = np.zeros_like(heat, dtype=bool)
        mask[y:y + s, x:x + s] = True
        inside.append(heat[mask].mean())
        outside.append(heat[~mask].mean())
    assert np.mean(inside) > 1.5 * np.mean(outside)


def test_gradcam_does_not_touch_the_prediction_model(trained):
    pred = Predictor(trained["run"].best_path)
    model = pred.classifier.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pred.explain(Image.new("RGB", (64, 64)))
    assert not model._forward_hooks and not model.layer4[-1]._forward_hooks
    for k, v in model.state_dict().items():
        assert (v == before[k]).all()
