"""The golden set: known by content, chosen once, its labels changed only with a reason, and never in a later run's
split."""
import shutil

import pytest

from conftest import tiny_config, write_class_folders
from core.data.golden import GoldenError, GoldenStore, carve_from_test, file_digests
from core.data.sources import load_dataset
from core.runs.life import prepare_run


@pytest.fixture
def golden_ws(tmp_path, workspace):
    data = write_class_folders(tmp_path / "dots", per_class=12, size=24, seed=2)
    ds = load_dataset(str(data))
    chosen = [(s.path, ds.classes[s.label]) for s in ds.samples[:3] + ds.samples[-3:]]
    store = GoldenStore(workspace)
    assert store.create(ds.source, chosen, "the first three of each class", actor="ana") == 1
    return workspace, data, ds, store, chosen


def test_made_once_and_described(golden_ws):
    ws, data, ds, store, chosen = golden_ws
    info = store.describe(ds.source)
    assert info["n"] == 6 and info["counts"] == {"blank": 3, "dot": 3} and info["version"] == 1
    assert info["created"]["actor"] == "ana"
    with pytest.raises(GoldenError, match="chosen once"):
        store.create(ds.source, chosen, "again")
    assert store.version("another dataset") == 0 and store.images("another dataset") == []


def test_relabel_needs_a_reason_and_bumps_the_version(golden_ws):
    ws, data, ds, store, chosen = golden_ws
    path = chosen[0][0]
    with pytest.raises(GoldenError, match="reason"):
        store.relabel(ds.source, path, "dot", reason=" ")
    assert store.relabel(ds.source, path, "dot", reason="a faint dot after all", actor="ben") == 2
    sha = file_digests(ws, [path])[path]
    assert {g.sha256: g.label for g in store.images(ds.source)}[sha] == "dot"
    last = store.history(ds.source)[0]
    assert (last["old_label"], last["new_label"], last["actor"], last["reason"]) == ("blank", "dot", "ben",
                                                                                      "a faint dot after all")
    assert store.relabel(ds.source, sha[:8], "blank", reason="no, blank") == 3  # by a hash prefix too
    with pytest.raises(GoldenError, match="names no image"):
        store.relabel(ds.source, "0" * 8, "dot", reason="x")


def test_renamed_and_copied_images_stay_golden(golden_ws, tmp_path):
    ws, data, ds, store, chosen = golden_ws
    moved = data / "blank" / "renamed.png"
    shutil.move(chosen[0][0], moved)  # renamed: found again by its bytes
    copy = data / "dot" / "copy_of_golden.png"
    shutil.copyfile(chosen[-1][0], copy)  # the same bytes elsewhere: kept out of training too
    found, missing = store.resolve(ds.source, [s.path for s in load_dataset(str(data)).samples])
    assert not missing and len(found) == 6
    assert str(moved) in {g.path for g in found}
    assert str(moved) in {g.path for g in store.images(ds.source)}  # the new place is remembered

    run = prepare_run(ws, tiny_config(data, batch_size=4))
    split = run.split()
    in_split = {r[0] for part in ("train", "val", "test") for r in split[part]}
    golden_paths = {g.path for g in found} | {str(copy)}
    assert not in_split & golden_paths
    assert len(in_split) == 12 * 2 + 1 - 7  # every other image is split
    assert split["golden_version"] == 1
    assert "7 image(s) of the golden set held out" in run.log_path.read_text()


def test_a_changed_file_is_hashed_again(workspace, tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"one")
    first = file_digests(workspace, [str(p)])[str(p)]
    p.write_bytes(b"two!")  # another size, so another record even within one clock tick
    assert file_digests(workspace, [str(p)])[str(p)] != first
    assert file_digests(workspace, [str(tmp_path / "gone.png")]) == {}


def test_carved_from_test_is_stratified_and_seeded():
    split = {"test": [[f"a{i}", "a"] for i in range(10)] + [[f"b{i}", "b"] for i in range(3)]}
    got = carve_from_test(split, 0.5, seed=1)
    assert sum(1 for _, c in got if c == "a") == 5 and sum(1 for _, c in got if c == "b") == 2
    assert got == carve_from_test(split, 0.5, seed=1) and got != carve_from_test(split, 0.5, seed=2)
    with pytest.raises(GoldenError):
        carve_from_test(split, 0)
    with pytest.raises(GoldenError, match="no test part"):
        carve_from_test({"test": []}, 0.5)


def test_one_image_with_two_labels_is_refused(workspace, tmp_path):
    data = write_class_folders(tmp_path / "d", per_class=3, size=16)
    a = data / "blank" / "blank_000.png"
    shutil.copyfile(a, data / "dot" / "same.png")
    with pytest.raises(GoldenError, match="same image with two labels"):
        GoldenStore(workspace).create("d", [(str(a), "blank"), (str(data / "dot" / "same.png"), "dot")], "x")
