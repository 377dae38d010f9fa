"""Checkpoints load with torch.load(weights_only=True)."""
import json

import torch

from core.models.resnet import model_from_checkpoint


def test_checkpoints_load_with_weights_only(trained):
    run = trained["run"]
    for path in (run.best_path, run.last_path):
        obj = torch.load(path, weights_only=True)
        meta = json.loads(obj["meta"])
        assert meta["classes"] == ["blank", "dot"]
        assert meta["config"]["arch"] == "resnet18"
        assert set(meta["normalization"]) == {"mean", "std"}
        assert json.loads(path.with_suffix(".json").read_text())["epoch"] == meta["epoch"]
    last = torch.load(run.last_path, weights_only=True)
    assert {"optimizer", "generator"} <= set(last)
    model, meta = model_from_checkpoint(run.best_path)
    assert meta["epoch"] == json.loads(run.best_path.with_suffix(".json").read_text())["epoch"]
