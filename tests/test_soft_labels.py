"""Soft labels: a CSV's probability column says how sure each label is; training targets that share on the label."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_config
from core.data import DatasetError, load_dataset, samples_from_split, split_to_json, stratified_split
from core.labels import LabelStore
from core.runs import Reporter, prepare_run
from core.train import build_trainer, train_one_epoch
from core.transforms import MixSpec, build_mix


def write_csv_set(root, rows_per_class=12, probability=lambda i: "0.7" if i % 2 else ""):
    """A CSV of two classes (bright / dark images); every other image's label is 70% sure."""
    root.mkdir(parents=True)
    lines = ["path,label,probability"]
    for label, level in (("dark", 40), ("bright", 200)):
        for i in range(rows_per_class):
            name = f"{label}_{i:02d}.png"
            Image.fromarray(np.full((24, 24, 3), level + i, np.uint8)).save(root / name)
            lines.append(f"{name},{label},{probability(i)}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


def test_csv_probability_column_is_read_kept_in_the_split_and_reset_by_a_correction(tmp_path, workspace):
    ds = load_dataset(str(write_csv_set(tmp_path / "set")))
    probs = {s.path.rsplit("/", 1)[-1]: s.probability for s in ds.samples}
    assert probs["dark_01.png"] == 0.7 and probs["dark_02.png"] == 1.0  # an empty cell is a sure label
    split = split_to_json(ds, stratified_split(ds, 0.25, 0.0, seed=0))
    back = {s.path: s.probability for part in ("train", "val") for s in samples_from_split(split, part)}
    assert back == {s.path: s.probability for s in ds.samples}
    unsure = next(s.path for s in ds.samples if s.probability < 1)
    LabelStore(workspace).set_label(ds.source, unsure, "bright")  # a person looked: the label is now sure
    fixed = {s.path: s for s in LabelStore(workspace).apply(ds).samples}
    assert fixed[unsure].probability == 1.0 and sum(s.probability < 1 for s in fixed.values()) == 11


@pytest.mark.parametrize("bad", ["1.5", "0", "-0.2", "sure", "nan"])
def test_a_bad_probability_names_the_line(tmp_path, bad):
    csv = write_csv_set(tmp_path / "set", probability=lambda i: bad if i == 3 else "")
    with pytest.raises(DatasetError, match=r"line 5: probability must be a number above 0 and at most 1"):
        load_dataset(str(csv))


def test_training_targets_the_label_probability_and_spreads_the_rest(tmp_path, workspace):
    run = prepare_run(workspace, tiny_config(write_csv_set(tmp_path / "set"), epochs=1, batch_size=4))
    t = build_trainer(workspace, run, run.config(), Reporter())
    seen = []
    criterion = t.criterion
    t.criterion = lambda logits, y: seen.append(y.clone()) or criterion(logits, y)
    train_one_epoch(t, 1, Reporter())
    targets = torch.cat(seen)
    assert targets.ndim == 2 and torch.allclose(targets.sum(1), torch.ones(len(targets)))
    # Two classes: a 70%-sure label is (0.7, 0.3); a sure one is one-hot. Both kinds are trained on.
    assert {round(v, 4) for v in targets.max(1).values.tolist()} == {0.7, 1.0}


def test_mix_blends_soft_targets_as_given():
    mix = build_mix(MixSpec(mixup=1.0, cutmix=0.0), 3)
    y = torch.tensor([[0.7, 0.15, 0.15], [0.0, 0.0, 1.0]])
    x = torch.rand(2, 3, 8, 8)
    mixed_x, mixed_y = mix(x, y, torch.Generator().manual_seed(0))
    d = x[0] - x[1]
    lam = float(((mixed_x[0] - x[1]) * d).sum() / (d * d).sum())  # mixed_x[0] = lam x[0] + (1 - lam) x[1]
    assert torch.allclose(mixed_y[0], lam * y[0] + (1 - lam) * y[1], atol=1e-4)
