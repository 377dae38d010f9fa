"""The split: stratified, reproducible, refusing classes too small to split, and groups (near-duplicates,
origins) kept in one part."""
import os

import numpy as np
import pytest
from PIL import Image

from conftest import make_dot_image, tiny_config, write_class_folders
from core.data.duplicates import dataset_duplicate_groups
from core.data.sources import DatasetError, load_dataset
from core.data.split import samples_from_split, stratified_split


def test_missing_val_is_carved_out_of_train(tmp_path):
    write_class_folders(tmp_path / "d" / "train", per_class=20, size=16)
    write_class_folders(tmp_path / "d" / "test", per_class=4, size=16)
    ds = load_dataset(str(tmp_path / "d"))
    split = stratified_split(ds, 0.25, 0.15, seed=0)
    assert len(split["test"]) == 8
    assert len(split["val"]) == 10 and len(split["train"]) == 30
    train_val = {ds.samples[i].path for i in split["train"] + split["val"]}
    assert all(os.sep + "train" + os.sep in p for p in train_val)


def test_split_is_stratified_and_reproducible(tmp_path):
    write_class_folders(tmp_path / "d", per_class=40, size=16)
    (tmp_path / "d" / "dot").joinpath("extra").mkdir()
    for i in range(20):  # unbalanced: 40 blank, 60 dot (some nested one level down)
        Image.new("RGB", (16, 16)).save(tmp_path / "d" / "dot" / "extra" / f"{i}.png")
    ds = load_dataset(str(tmp_path / "d"))
    a = stratified_split(ds, 0.15, 0.15, seed=7)
    b = stratified_split(ds, 0.15, 0.15, seed=7)
    c = stratified_split(ds, 0.15, 0.15, seed=8)
    assert a == b and a != c
    assert sorted(a["train"] + a["val"] + a["test"]) == list(range(100))
    for part in ("val", "test"):
        labels = [ds.samples[i].label for i in a[part]]
        assert labels.count(0) == 6 and labels.count(1) == 9  # 15% of 40 and of 60


def test_too_small_class_named(tmp_path):
    write_class_folders(tmp_path / "d", per_class=10, size=16)
    (tmp_path / "d" / "rare").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "d" / "rare" / "1.png")
    ds = load_dataset(str(tmp_path / "d"))
    with pytest.raises(DatasetError, match="'rare' has only 1"):
        stratified_split(ds, 0.15, 0.15, seed=0)


def test_a_split_written_with_label_probabilities_still_loads(tmp_path):
    """Runs from before soft labels left carry a 5th item per row (the label's probability): read, not used."""
    split = {"classes": ["a", "b"], "train": [["/x/1.png", "a", "", "", 0.7], ["/x/2.png", "b", "mono"]]}
    got = samples_from_split(split, "train")
    assert [(s.path, s.label, s.group, s.origin) for s in got] == [("/x/1.png", 0, "", ""), ("/x/2.png", 1, "mono", "")]


def test_group_aware_split_never_separates_a_group(twins):
    root, planted = twins
    ds = load_dataset(str(root))
    groups = dataset_duplicate_groups(ds)
    index = {s.path: i for i, s in enumerate(ds.samples)}

    def separated(split):
        part = {i: p for p, idx in split.items() for i in idx}
        return sum(part[index[a]] != part[index[b]] for a, b in planted)

    plain = [separated(stratified_split(ds, 0.2, 0.2, seed)) for seed in range(5)]
    assert sum(plain) > 0  # the ordinary split does separate twins: the leak this guards against
    for seed in range(5):
        split = stratified_split(ds, 0.2, 0.2, seed, together=groups)
        assert separated(split) == 0
        assert sorted(i for idx in split.values() for i in idx) == list(range(len(ds.samples)))
        for part in ("val", "test"):  # still stratified: both classes in every part, near their share
            labels = [ds.samples[i].label for i in split[part]]
            assert set(labels) == {0, 1}
            assert abs(len(split[part]) - 0.2 * len(ds.samples)) <= 3


def test_a_group_larger_than_a_part_stays_in_training(tmp_path):
    from core.data.sources import Dataset, Sample
    samples = [Sample(f"p{i}", i % 2) for i in range(20)]
    ds = Dataset("x", "x", ["a", "b"], samples)
    big = [i for i in range(20) if i % 2 == 0][:8]  # 8 of class a's 10: larger than any val/test share
    split = stratified_split(ds, 0.2, 0.2, 0, together=[big])
    part = {i: p for p, idx in split.items() for i in idx}
    assert {part[i] for i in big} == {"train"}
    # class a's two loose images are all it can give to the other parts; class b splits as usual
    assert sum(ds.samples[i].label == 0 for i in split["val"] + split["test"]) == 2
    assert all(any(ds.samples[i].label == 1 for i in split[p]) for p in ("val", "test"))


def _module_folders(root, modules=6, per=5):
    """Class folders with one sub-folder per module; every module has cells of both classes."""
    rng = np.random.default_rng(1)
    for m in range(modules):
        for c in ("good", "bad"):
            d = root / c / f"module{m}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per):
                Image.fromarray(make_dot_image(rng, 32, dot=c == "bad")[0]).save(d / f"{m}_{i}.png")
    return root


def test_origin_split_keeps_each_module_in_one_part(tmp_path, workspace):
    from core.runs.life import prepare_run
    root = _module_folders(tmp_path / "cells")
    ds = load_dataset(str(root))
    assert {s.origin for s in ds.samples} == {f"module{m}" for m in range(6)}
    run = prepare_run(workspace, tiny_config(root, split_groups="origin", batch_size=8))
    split = run.split()
    part_of_module = {}
    for part in ("train", "val", "test"):
        for row in split[part]:
            part_of_module.setdefault(row[3], set()).add(part)
    assert all(len(parts) == 1 for parts in part_of_module.values()), part_of_module
    assert {p for parts in part_of_module.values() for p in parts} == {"train", "val", "test"}
    plain = prepare_run(workspace, tiny_config(root, batch_size=8)).split()
    mixed = {}
    for part in ("train", "val", "test"):
        for row in plain[part]:
            mixed.setdefault(row[3], set()).add(part)
    assert any(len(parts) > 1 for parts in mixed.values())  # the plain split mixes modules


def test_origin_from_a_csv_group_column_and_a_clear_error_without_one(tmp_path, workspace):
    from core.config import ConfigError
    from core.runs.life import prepare_run
    root = _module_folders(tmp_path / "cells", modules=4)
    lines = ["path,label,group"] + [f"{p.relative_to(root)},{p.parent.parent.name},batch-{p.parent.name[-1]}"
                                    for p in sorted(root.rglob("*.png"))]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    ds = load_dataset(str(root / "labels.csv"))
    assert {s.origin for s in ds.samples} == {f"batch-{m}" for m in range(4)}
    flat = tmp_path / "flat.csv"
    flat.write_text("\n".join(["path,label"] + [f"{p},{p.parent.parent.name}" for p in sorted(root.rglob("*.png"))]))
    with pytest.raises(ConfigError, match="names no origins"):
        prepare_run(workspace, tiny_config(flat, split_groups="origin", batch_size=8))
