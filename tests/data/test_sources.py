"""Dataset sources: class folders, given splits, CSV, the built-in set, and what is skipped and why."""
import os

import numpy as np
import pytest
from PIL import Image

from conftest import write_class_folders
from core.data.sources import DatasetError, load_dataset
from core.data.split import split_to_json, stratified_split


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
