"""Self-supervised pretraining (weights="self-supervised", core/train/pretrain.py): the loss, the schedule, which images
it sees, and how a run pretrains, saves, fine-tunes from and resumes with its backbone."""
import math
import shutil

import numpy as np
import pytest
import torch

from conftest import tiny_config
from core.config import ConfigError
from core.models.resnet import read_state_dict_file
from core.runs.life import Reporter, prepare_run
from core.runs.rundata import load_run_data
from core.train.loop import build_trainer, fit
from core.train.pretrain import LR, lr_at, nt_xent, pretraining_images, pretraining_seconds


class Recorder(Reporter):
    def __init__(self, stop_at_stage=None):
        self.lines, self.stages, self.stop_at_stage = [], [], stop_at_stage

    def log(self, message):
        self.lines.append(message)

    def stage(self, name, done=0, total=0):
        self.stages.append(name)

    def should_stop(self):
        return self.stop_at_stage is not None and self.stop_at_stage in self.stages


def ssl_config(data, **over):
    return tiny_config(data, **{**dict(weights="self-supervised", ssl_epochs=2, ssl_image_size=32,
                                       ssl_batch_size=16, epochs=1), **over})


def test_contrastive_loss_rewards_finding_the_partner_view():
    torch.manual_seed(0)
    a = torch.randn(8, 16)
    matched, match = nt_xent(torch.cat([a, a + 0.01 * torch.randn(8, 16)]))
    assert match == 1.0
    unrelated, _ = nt_xent(torch.randn(16, 16))
    assert matched < 0.5 < unrelated
    # Random projections: about the cross-entropy of a uniform guess among the 2N - 1 others.
    assert abs(unrelated.item() - math.log(15)) < 1.5
    swapped, swapped_match = nt_xent(torch.cat([a, a.flip(0)]))  # partners mixed up: worse than random
    assert swapped_match < 0.5 and swapped > unrelated


def test_pretraining_rate_warms_up_then_decays_to_zero():
    total = 100
    rates = [lr_at(s, total) for s in range(total)]
    assert rates[0] < rates[5] < rates[9] == pytest.approx(LR)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))
    assert rates[-1] < 0.01 * LR


def test_config_checks_the_pretraining_fields():
    with pytest.raises(ConfigError, match="ssl_image_size"):
        ssl_config("x", ssl_image_size=16).validate()
    with pytest.raises(ConfigError, match="ssl_batch_size"):
        ssl_config("x", ssl_batch_size=1).validate()
    with pytest.raises(ConfigError, match="one device"):
        ssl_config("x", devices=2).validate()


def test_estimate_adds_pretraining_only_when_asked():
    cfg = ssl_config("x", image_size=64, ssl_image_size=32, ssl_epochs=10)
    # 10 epochs x 2 views x 100 images at a quarter of the pixels, at 50 training images/s.
    assert pretraining_seconds(cfg, 100, 50.0) == pytest.approx(10 * 2 * 100 * 0.25 / 50.0)
    assert pretraining_seconds(tiny_config("x"), 100, 50.0) == 0.0


def test_pretraining_sees_training_and_unlabeled_images_never_validation_or_test(dot_folder, workspace):
    (dot_folder / "unlabeled").mkdir()
    for i, src in enumerate(sorted((dot_folder / "dot").iterdir())[:5]):
        shutil.copy(src, dot_folder / "unlabeled" / f"u{i}.png")
    run = prepare_run(workspace, ssl_config(dot_folder))
    assert len(run.split()["unlabeled"]) == 5
    data = load_run_data(workspace, run, (32, 32), torch.device("cpu"),
                         parts=("train", "val", "test", "unlabeled"))
    seen = set(pretraining_images(data).tolist())
    assert seen == set(data.parts["train"].tolist()) | set(data.parts["unlabeled"].tolist())
    assert not seen & (set(data.parts["val"].tolist()) | set(data.parts["test"].tolist()))
    assert (data.labels[data.parts["unlabeled"]] == -1).all()
    # A run not asking for pretraining does not carry the unlabeled images in its split.
    assert "unlabeled" not in prepare_run(workspace, tiny_config(dot_folder)).split()


def test_run_pretrains_saves_the_backbone_and_fine_tunes_from_it(dot_folder, workspace):
    run = prepare_run(workspace, ssl_config(dot_folder))
    rec = Recorder()
    result = fit(workspace, run, rec)
    assert result["status"] == "done" and run.best_path.exists()
    assert "self-supervised pretraining" in rec.stages
    assert sum(line.startswith("self-supervised epoch") for line in rec.lines) == 2
    backbone = read_state_dict_file(run.pretrained_path)
    assert backbone and not any(k.startswith("fc.") for k in backbone)
    meta = __import__("json").loads(run.pretrained_path.with_suffix(".json").read_text())
    assert meta["images"] == len(run.split()["train"]) and meta["epochs"] == 2 and len(meta["history"]) == 2
    assert all(np.isfinite(h["loss"]) and 0 <= h["view_match"] <= 1 for h in meta["history"])

    # Fine-tuning starts from the backbone (not from a random init), and a resumed or rebuilt run does not
    # pretrain again.
    rec2 = Recorder()
    t = build_trainer(workspace, run, run.config(), rec2)
    assert torch.equal(t.model.conv1.weight.detach().cpu(), backbone["conv1.weight"])
    assert torch.equal(t.model.layer4[1].bn2.running_mean.cpu(), backbone["layer4.1.bn2.running_mean"])
    assert not any(line.startswith("self-supervised epoch") for line in rec2.lines)
    assert any("self-supervised backbone" in line for line in rec2.lines)
    scratch = build_trainer(workspace, prepare_run(workspace, tiny_config(dot_folder, epochs=1)),
                            tiny_config(dot_folder, epochs=1), Reporter())
    assert not torch.equal(scratch.model.conv1.weight.detach().cpu(), backbone["conv1.weight"])


def test_stop_during_pretraining_ends_the_run_without_a_backbone(dot_folder, workspace):
    run = prepare_run(workspace, ssl_config(dot_folder))
    result = fit(workspace, run, Recorder(stop_at_stage="self-supervised pretraining"))
    assert result["status"] == "stopped" and result["epochs_done"] == 0
    assert not run.pretrained_path.exists() and not run.best_path.exists()


def test_the_backbone_file_starts_another_run(dot_folder, workspace):
    first = prepare_run(workspace, ssl_config(dot_folder))
    fit(workspace, first)
    cfg = tiny_config(dot_folder, epochs=1, weights=str(first.pretrained_path))
    t = build_trainer(workspace, prepare_run(workspace, cfg), cfg, Reporter())
    assert torch.equal(t.model.conv1.weight.detach().cpu(), read_state_dict_file(first.pretrained_path)["conv1.weight"])


def test_run_estimate_includes_pretraining():
    from core.train.estimate import run_seconds
    counts = {"train": 100, "val": 20, "test": 20}
    ssl = ssl_config("x", image_size=64, ssl_image_size=32, ssl_epochs=10)
    plain = ssl_config("x", image_size=64, weights="none")
    assert run_seconds(ssl, counts, 50.0, 0.0) - run_seconds(plain, counts, 50.0, 0.0) == pytest.approx(
        pretraining_seconds(ssl, 100, 50.0))
