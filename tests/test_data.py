"""Dataset sources, skipped files, the split, and the decoded-image cache."""
import os
import time

import numpy as np
import pytest
from PIL import Image

from conftest import write_class_folders
from core.data.cache import ImageCache
from core.data.sources import DatasetError, load_dataset
from core.data.split import samples_from_split, split_to_json, stratified_split


def test_class_folders(dot_folder):
    ds = load_dataset(str(dot_folder))
    assert ds.classes == ["blank", "dot"]
    assert ds.class_counts() == {"blank": 30, "dot": 30}
    assert not ds.given_splits


def test_split_folders_used_as_given(tmp_path):
    for part, name in (("train", "train"), ("valid", "valid"), ("test", "test")):
        write_class_folders(tmp_path / "d" / name, per_class=6 if part == "train" else 3, size=16)
    ds = load_dataset(str(tmp_path / "d"))
    split = stratified_split(ds, 0.15, 0.15, seed=1)
    assert [len(split[p]) for p in ("train", "val", "test")] == [12, 6, 6]
    test_paths = {ds.samples[i].path for i in split["test"]}
    assert all(os.sep + "test" + os.sep in p for p in test_paths)


def test_missing_val_is_carved_out_of_train(tmp_path):
    write_class_folders(tmp_path / "d" / "train", per_class=20, size=16)
    write_class_folders(tmp_path / "d" / "test", per_class=4, size=16)
    ds = load_dataset(str(tmp_path / "d"))
    split = stratified_split(ds, 0.25, 0.15, seed=0)
    assert len(split["test"]) == 8
    assert len(split["val"]) == 10 and len(split["train"]) == 30
    train_val = {ds.samples[i].path for i in split["train"] + split["val"]}
    assert all(os.sep + "train" + os.sep in p for p in train_val)


def test_csv_source_relative_paths(tmp_path):
    root = write_class_folders(tmp_path / "imgs", per_class=5, size=16)
    lines = ["path,label"] + [f"imgs/{c}/{f.name},{c.upper()}" for c in ("blank", "dot")
                              for f in sorted((root / c).iterdir())]
    (tmp_path / "labels.csv").write_text("\n".join(lines))
    ds = load_dataset(str(tmp_path / "labels.csv"))
    assert ds.classes == ["BLANK", "DOT"] and len(ds.samples) == 10


def test_elpv_builtin():
    ds = load_dataset("elpv")
    assert len(ds.samples) == 2624 and ds.classes == ["defective", "functional"]
    assert {s.group for s in ds.samples} == {"mono", "poly"}
    ds4 = load_dataset("elpv4")
    assert len(ds4.classes) == 4


def test_bad_files_are_skipped_with_reasons(dot_folder):
    (dot_folder / "dot" / "broken.png").write_bytes(b"not an image")
    (dot_folder / "dot" / "empty.jpg").write_bytes(b"")
    (dot_folder / "dot" / ".DS_Store").write_bytes(b"\0\0")
    (dot_folder / "__MACOSX").mkdir()
    (dot_folder / "__MACOSX" / "x.png").write_bytes(b"junk")
    ds = load_dataset(str(dot_folder))
    assert len(ds.samples) == 60
    reasons = dict((os.path.basename(p), r) for p, r in ds.skipped)
    assert set(reasons) == {"broken.png", "empty.jpg"}
    assert "empty" in reasons["empty.jpg"] and "not a recognised" in reasons["broken.png"]


@pytest.mark.parametrize("make,message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "f.txt").write_text("x") and p / "f.txt", "is a file"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no images found"),
])
def test_unusable_sources_have_clear_errors(tmp_path, make, message):
    with pytest.raises(DatasetError, match=message):
        load_dataset(str(make(tmp_path)))


def test_one_class_only_is_refused(tmp_path):
    write_class_folders(tmp_path / "d", per_class=4, size=16, classes=("only",))
    with pytest.raises(DatasetError, match="only one class"):
        load_dataset(str(tmp_path / "d"))


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


def test_cache_reuses_decoded_images_and_notices_changed_files(tmp_path):
    root = write_class_folders(tmp_path / "d", per_class=3, size=16)
    paths = sorted(str(p) for p in root.rglob("*.png"))
    cache = ImageCache(max_bytes=10 * 2**20)
    first = cache.get(paths, (8, 8))
    assert cache.get(paths, (8, 8)) is first
    time.sleep(0.01)
    Image.new("RGB", (16, 16), (255, 0, 0)).save(paths[0])
    os.utime(paths[0], ns=(time.time_ns(), time.time_ns() + 10**9))
    second = cache.get(paths, (8, 8))
    assert second is not first
    assert second.array[0, 0, 0].tolist() == [255, 0, 0]


def test_cache_spills_to_memory_mapped_file_past_its_bound(tmp_path):
    root = write_class_folders(tmp_path / "d", per_class=10, size=16)
    paths = sorted(str(p) for p in root.rglob("*.png"))
    (root / "dot" / "zz_broken.png").write_bytes(b"junk")
    paths.append(str(root / "dot" / "zz_broken.png"))
    cache = ImageCache(max_bytes=1000)  # smaller than 21 images of 16x16x3
    d = cache.get(paths, (16, 16), cache_dir=tmp_path / "cache")
    assert d.on_disk and isinstance(d.array, np.memmap)
    assert cache.memory_bytes() == 0
    assert list(d.failed) == [20]
    np.testing.assert_array_equal(d.array[0], np.asarray(Image.open(paths[0]).convert("RGB")))
    again = ImageCache(max_bytes=1000).get(paths, (16, 16), cache_dir=tmp_path / "cache")  # a new process
    assert again.on_disk and list(again.failed) == [20]
    assert len(list((tmp_path / "cache").glob("*.u8"))) == 1


def test_a_csv_with_more_columns_than_path_label_split_group_imports_and_they_are_ignored(tmp_path):
    """Soft labels left the training path (they measured no gain: bench/RESULTS.md); a CSV that still carries a
    probability column, or any other, imports as before with its labels as given."""
    root = tmp_path / "set"
    root.mkdir()
    lines = ["path,label,probability,notes"]
    for label, level in (("dark", 40), ("bright", 200)):
        for i in range(6):
            Image.fromarray(np.full((16, 16, 3), level + i, np.uint8)).save(root / f"{label}_{i}.png")
            lines.append(f"{label}_{i}.png,{label},{'0.7' if i % 2 else ''},seen twice")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    ds = load_dataset(str(root / "labels.csv"))
    assert len(ds.samples) == 12 and ds.classes == ["bright", "dark"]
    split = split_to_json(ds, stratified_split(ds, 0.25, 0.0, seed=0))
    assert all(len(row) == 3 for part in ("train", "val") for row in split[part])  # path, label, group


def test_a_split_written_with_label_probabilities_still_loads(tmp_path):
    """Runs from before soft labels left carry a 5th item per row (the label's probability): read, not used."""
    split = {"classes": ["a", "b"], "train": [["/x/1.png", "a", "", "", 0.7], ["/x/2.png", "b", "mono"]]}
    got = samples_from_split(split, "train")
    assert [(s.path, s.label, s.group, s.origin) for s in got] == [("/x/1.png", 0, "", ""), ("/x/2.png", 1, "mono", "")]
