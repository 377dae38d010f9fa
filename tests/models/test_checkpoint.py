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


def test_nonfinite_weights_are_named_and_large_finite_ones_are_not():
    from core.models.checkpoint import nonfinite_tensors
    big = torch.full((1000, 1000), torch.finfo(torch.float32).max)  # its float32 sum overflows; every value is finite
    state = {"big": big, "steps": torch.tensor(3), "half": torch.ones(4, dtype=torch.bfloat16)}
    assert nonfinite_tensors(state) == []
    for name, value in (("inf", float("inf")), ("minus_inf", float("-inf")), ("nan", float("nan"))):
        t = torch.zeros(5)
        t[2] = value
        assert nonfinite_tensors({**state, name: t}) == [name]
    both = torch.tensor([float("inf"), float("-inf")])  # their sum is NaN: still refused
    assert nonfinite_tensors({"both": both, "half": torch.tensor([float("nan")], dtype=torch.float16)}) == ["both", "half"]
