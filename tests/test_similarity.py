"""Near-duplicates, split leakage, the group-aware split and nearest neighbours, on generated images with planted
twins (a JPEG re-save, a resize round trip, a byte copy)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, make_dot_image, near_copy, tiny_config, write_set_with_twins
from core.data.duplicates import dataset_duplicate_groups, groups_from_pairs, hash_pairs, perceptual_hashes
from core.data.sources import load_dataset
from core.data.split import stratified_split
from core.explain.leakage import run_duplicates
from core.explain.neighbours import nearest


@pytest.fixture
def twins(tmp_path):
    return write_set_with_twins(tmp_path / "twins")


def test_planted_twins_are_the_near_duplicate_groups(twins):
    root, planted = twins
    ds = load_dataset(str(root))
    groups = dataset_duplicate_groups(ds)
    found = {frozenset(ds.samples[i].path for i in g) for g in groups}
    assert found == {frozenset(p) for p in planted}  # every twin found, and nothing else grouped


def test_hash_distances_tell_twins_from_strangers():
    rng = np.random.default_rng(3)
    originals = [make_dot_image(rng, 48, dot=bool(i % 2))[0] for i in range(12)]
    twins = [np.asarray(near_copy(a, k % 2)) for k, a in enumerate(originals)]
    h = perceptual_hashes(np.stack([np.asarray(Image.fromarray(a).resize((32, 32), Image.Resampling.BILINEAR))
                                    for a in originals + twins]))
    d = np.bitwise_count(h[:, None] ^ h[None, :])
    n = len(originals)
    assert d[np.arange(n), np.arange(n) + n].max() <= 2
    strangers = d[:n, :n][~np.eye(n, dtype=bool)]
    assert strangers.min() > 6
    assert [tuple(p[:2]) for p in hash_pairs(h, 2)] == [(i, i + n) for i in range(n)]


def test_groups_are_connected_components():
    assert groups_from_pairs(6, [(0, 2, 1), (2, 5, 1), (3, 4, 1)]) == [[0, 2, 5], [3, 4]]
    assert groups_from_pairs(3, []) == []


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


def test_runs_split_with_groups_do_not_leak_and_the_report_says_so(twins, workspace):
    from core.runs.life import prepare_run
    root, planted = twins
    plain = prepare_run(workspace, tiny_config(root))
    grouped = prepare_run(workspace, tiny_config(root, split_groups="duplicates"))
    r_plain = run_duplicates(workspace, plain)
    r_grouped = run_duplicates(workspace, grouped)
    assert r_plain["n_groups"] == r_grouped["n_groups"] == len(planted)
    assert r_plain["n_straddling"] > 0 and r_grouped["n_straddling"] == 0
    assert sum(r_plain["straddling_by_parts"].values()) == r_plain["n_straddling"]
    leaking = next(g for g in r_plain["groups"] if g["straddles"])
    assert len({m["part"] for m in leaking["members"]}) == 2
    assert {frozenset(g) for g in grouped.split()["kept_together"]} == {frozenset(p) for p in planted}
    assert "near-duplicate groups" in grouped.log_path.read_text()


def test_nearest_training_image_of_a_twin_is_its_twin(twins, workspace):
    # Features of a briefly trained model: a near-identical image lands near its twin whatever the model learnt.
    from core.explain.features import run_features
    from core.runs.life import prepare_run
    from core.train.loop import fit
    root, planted = twins
    run = prepare_run(workspace, tiny_config(root, epochs=1))
    fit(workspace, run)
    rf = run_features(workspace, run)
    assert rf.features.shape == (len(rf.paths), 512)
    train, others = rf.part("train"), np.concatenate([rf.part("val"), rf.part("test")])
    twin_of = {a: b for a, b in planted} | {b: a for a, b in planted}
    idx, sims = nearest(rf.features[others], rf.features[train], k=3)
    checked = 0
    for row, i in enumerate(others):
        twin = twin_of.get(rf.paths[i])
        if twin is not None and twin in {rf.paths[j] for j in train}:
            assert twin in [rf.paths[train[j]] for j in idx[row]]
            assert sims[row, 0] >= sims[row, 1] >= sims[row, 2]
            checked += 1
    assert checked > 0
    # all-vs-all, a row is not its own neighbour
    idx_self, _ = nearest(rf.features, rf.features, k=1, exclude_self=True)
    assert all(idx_self[i, 0] != i for i in range(len(rf.paths)))
    # cached with the run; a new checkpoint makes it stale
    assert (run.dir / "features.npz").exists()
    again = run_features(workspace, run)
    assert again.paths == rf.paths and np.allclose(again.features, rf.features)
    by_features = run_duplicates(workspace, run, by=("features",), similarity=0.9999)
    assert {frozenset(m["path"] for m in g["members"]) for g in by_features["groups"]} >= {
        frozenset(p) for p in planted if Path(p[0]).read_bytes() == Path(p[1]).read_bytes()}  # identical features


def test_duplicates_cli_reports_groups_and_leaks(twins, tmp_path):
    from core.runs.life import prepare_run
    from core.workspace.store import Workspace
    root, planted = twins
    ws = Workspace(tmp_path / "ws")
    run = prepare_run(ws, tiny_config(root))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "core", "--workspace", str(ws.root), *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    out = cli("duplicates", run.id, "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["n_groups"] == len(planted)
    assert report["n_straddling"] == sum(g["straddles"] for g in report["groups"]) > 0
    assert all({"path", "label", "part"} <= set(m) for g in report["groups"] for m in g["members"])
    text = cli("duplicates", run.id)
    assert text.returncode == 0 and "LEAKS" in text.stdout and "--split-groups duplicates" in text.stdout
    bad = cli("duplicates", run.id, "--by", "colour")
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "hash and/or features" in bad.stderr
    missing = cli("duplicates", "no-such-run")
    assert missing.returncode == 2 and "no run" in missing.stderr
    untrained = cli("duplicates", run.id, "--by", "features")
    assert untrained.returncode == 2 and "train it first" in untrained.stderr


def test_prediction_evidence_names_the_twin_and_flags_the_unfamiliar(twins, workspace):
    from core.deploy.predict import nearest_training
    from core.explain.features import training_neighbours
    from core.runs.life import prepare_run
    from core.train.loop import fit
    root, planted = twins
    run = prepare_run(workspace, tiny_config(root, epochs=2))
    fit(workspace, run)
    index = training_neighbours(workspace, run)
    train = set(index.paths)
    twin_of = {a: b for a, b in planted} | {b: a for a, b in planted}
    asked = [p for p in twin_of if p not in train and twin_of[p] in train]
    assert asked
    stripes = np.zeros((48, 48, 3), dtype=np.uint8)
    stripes[:, ::4] = 255  # nothing like the noise-and-square images it was trained on
    found = nearest_training(workspace, run.id, asked + [Image.fromarray(stripes), b"not an image"], k=3)
    for path, r in zip(asked, found):
        assert twin_of[path] in [n["path"] for n in r["neighbours"]]
        assert not r["unlike"]
        labels = {n["path"]: n["label"] for n in r["neighbours"]}
        assert labels[twin_of[path]] == Path(twin_of[path]).parent.name
    # the stripes lie farther from every training image than a typical validation image does
    assert found[-2]["distance"] > np.median(index.val_distance)
    assert all(r["unlike"] == (r["distance"] > index.threshold) for r in found[:-1])
    assert "error" in found[-1]
    # the threshold is the validation part's 95th percentile: about one validation image in 20 is "unlike"
    assert np.mean(index.val_distance > index.threshold) <= 0.05 + 1 / len(index.val_distance)


def test_projections_keep_clusters_apart():
    from core.explain.embedding import project
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (40, 64)) + 8
    b = rng.normal(0, 1, (40, 64)) - 8
    for method in ("pca", "tsne"):
        xy = project(np.concatenate([a, b]), method)
        assert xy.shape == (80, 2) and np.isfinite(xy).all()
        ca, cb = xy[:40].mean(0), xy[40:].mean(0)
        spread = max(xy[:40].std(0).max(), xy[40:].std(0).max())
        assert np.linalg.norm(ca - cb) > 3 * spread, method
    with pytest.raises(Exception, match="unknown map method"):
        project(a, "mds")


def test_run_map_describes_every_image_and_is_cached(twins, workspace):
    from core.explain.embedding import run_map
    from core.runs.life import prepare_run
    from core.train.loop import fit
    root, _ = twins
    run = prepare_run(workspace, tiny_config(root, epochs=2))
    fit(workspace, run)
    m = run_map(workspace, run, "pca")
    n = len(m["path"])
    assert n == sum(len(v) for k, v in run.split().items() if k in ("train", "val", "test"))
    assert all(len(m[k]) == n for k in ("x", "y", "label", "predicted", "confidence", "correct", "part", "label_doubt"))
    assert set(m["part"]) == {"train", "val", "test"}
    # right or wrong agrees with the label doubt: a negative margin means the model prefers another class
    assert all(ok == (d > 0) for ok, d in zip(m["correct"], m["label_doubt"]) if d != 0)
    # the test part's predictions are the evaluation's (one inference path)
    from core.infer.evaluate import read_predictions
    evaluated = {r["path"]: r["predicted"] for r in read_predictions(run)}
    mine = {p: q for p, q, part in zip(m["path"], m["predicted"], m["part"]) if part == "test"}
    assert mine == evaluated
    assert (run.dir / "map-pca.npz").exists()
    assert run_map(workspace, run, "pca")["x"] == m["x"]


def test_unlike_means_beyond_the_validation_percentile():
    from core.explain.features import TrainingNeighbours
    from core.explain.neighbours import normalize_rows
    rng = np.random.default_rng(0)
    train = rng.normal(0, 1, (50, 8))
    index = TrainingNeighbours(np.zeros(8), normalize_rows(train), train, [f"t{i}" for i in range(50)], ["a"] * 50,
                               threshold=1.0, val_distance=np.array([0.5, 0.8]))
    near, far = train[3] + 0.01, train[3] * 10
    out = index.query(np.stack([near, far]), k=2)
    assert out[0]["neighbours"][0]["path"] == "t3" and out[0]["distance"] < 0.05 and not out[0]["unlike"]
    assert out[1]["neighbours"][0]["path"] == "t3"  # the same direction: the most alike, yet far away
    assert out[1]["distance"] > 1.0 and out[1]["unlike"]


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


def test_outliers_rank_planted_odd_images_first(tmp_path, workspace):
    from conftest import write_class_folders
    from core.explain.features import outliers
    from core.runs.life import prepare_run
    from core.train.loop import fit
    root = write_class_folders(tmp_path / "d", per_class=30, size=48)
    odd = []
    for k, c in enumerate(("blank", "dot", "blank")):  # nothing like the noise-and-square images
        a = np.zeros((48, 48, 3), dtype=np.uint8)
        a[:, k::3 + k] = 255
        path = root / c / f"odd_{k}.png"
        Image.fromarray(a).save(path)
        odd.append(str(path))
    run = prepare_run(workspace, tiny_config(root, epochs=2))
    fit(workspace, run)
    ranked = outliers(workspace, run)
    assert len(ranked) == sum(len(v) for k, v in run.split().items() if k in ("train", "val", "test"))
    assert [r["distance"] for r in ranked] == sorted((r["distance"] for r in ranked), reverse=True)
    top = [r["path"] for r in ranked[:len(ranked) // 10]]
    assert set(odd) <= set(top), [(r["path"].rsplit("/", 1)[-1], round(r["distance"], 2)) for r in ranked[:8]]
    assert all(r["far"] for r in ranked if r["path"] in odd and r["part"] != "val")
