"""Mixup and CutMix (cfg.mixup, cfg.cutmix): what a mixed batch holds, and training with them."""
import pytest
import torch

from conftest import tiny_config
from core.data.transforms import MixSpec, build_mix
from core.runs.life import prepare_run
from core.train.loop import fit


def constant_batch():
    # Image i is the constant i, so every mixed pixel says where it came from; the reversed batch pairs
    # image 0 with 3 and 1 with 2, each of the other class.
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 16, 16).contiguous()
    return x, torch.tensor([0, 0, 1, 1])


def test_off_is_no_mixing():
    assert build_mix(MixSpec(0.0, 0.0), 2) is None


@pytest.mark.parametrize("seed", range(5))
def test_mixup_blends_images_and_targets_by_one_weight(seed):
    x, y = constant_batch()
    mixed, target = build_mix(MixSpec(mixup=0.8), 2)(x, y, torch.Generator().manual_seed(seed))
    assert torch.allclose(target.sum(1), torch.ones(4))
    lam = target[0, 0]  # image 0 (class 0) keeps lam of itself
    assert torch.allclose(mixed[0], torch.full_like(mixed[0], float((1 - lam) * 3)), atol=1e-5)
    assert torch.allclose(target[3], torch.stack([1 - lam, lam]))  # its partner, the other way round


@pytest.mark.parametrize("seed", range(5))
def test_cutmix_targets_are_the_pasted_area(seed):
    x, y = constant_batch()
    mixed, target = build_mix(MixSpec(cutmix=1.0), 2)(x, y, torch.Generator().manual_seed(seed))
    pasted = (mixed[0, 0] == 3).float().mean()  # the share of image 0 now from image 3 (class 1)
    assert float(target[0, 1]) == pytest.approx(float(pasted))
    assert torch.equal(mixed[:, :, 0, 0], mixed[:, :1, 0, 0].expand(4, 3))  # the box spans all channels


def test_mixing_is_a_function_of_the_generator():
    x, y = constant_batch()
    mix = build_mix(MixSpec(mixup=0.8, cutmix=1.0), 2)
    a = mix(x, y, torch.Generator().manual_seed(3))
    b = mix(x, y, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_training_with_mixup_and_cutmix_runs_through_a_weighted_smoothed_loss(dot_folder, workspace):
    run = prepare_run(workspace, tiny_config(dot_folder, epochs=3, mixup=0.8, cutmix=1.0, lr=3e-3,
                                             class_weights=True, label_smoothing=0.1))
    result = fit(workspace, run)
    assert result["status"] == "done" and len(run.history()) == 3
    assert all(0 <= h["train_acc"] <= 1 for h in run.history())
    assert result["test_acc"] is not None
