"""Odd images and near-duplicates: cleanlab's Datalab against the studio's own, on planted ones (issue 38).

A real image set gets, in its class folders, a handful of out-of-domain images (images of the other set, and noise)
and resized copies of some of its own images. A run is trained on it by the studio (ResNet18 from scratch); both
sides read the same penultimate features of that run (core/explain/features.py):

- outliers: the studio's `outliers` (distance to the nearest class centre in units of the class's spread, "far"
  beyond the validation part's 95th percentile) against Datalab's `outlier` issue type (kNN distance in features);
- near-duplicates: the studio's `run_duplicates` (perceptual hash within 6 bits, or centred-feature cosine >= 0.99)
  against Datalab's `near_duplicate` issue type;
- non_iid: Datalab's test that the order of the data is random, with the images in folder order and shuffled (the
  studio has no such check: its split is a seeded stratified shuffle, so the order on disk never reaches training).

Per side: how many planted items are flagged (recall), how many of the flagged are planted (precision), and the
precision of the first N of its ranking (N = planted). Sets: scikit-learn's digits (32 px), or ELPV with --elpv.

    pip install 'cleanlab[datalab]'   # Datalab's extras (Hugging Face datasets, pyarrow): for this bench only
    python bench/datalab_issues.py [--elpv] [--epochs 8] [--outliers 12] [--copies 12] [--seed 0]

Prints one JSON document, with the CPU. The studio itself needs none of Datalab's extras: it kept its own detectors
(bench/RESULTS.md says why, with these figures).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

RECIPE = {"weights": "none", "optimizer": "adamw", "lr": 2e-3, "weight_decay": 5e-4, "schedule": "onecycle",
          "hflip": False, "vflip": False, "rot90": False, "normalization": "dataset", "split_seed": 42}


def write_elpv(root: Path, size: int) -> Path:
    from elpv_dataset.utils import load_dataset
    images, proba, _types = load_dataset()
    for i, (img, p) in enumerate(zip(images, proba)):
        folder = root / ("defective" if p >= 0.5 else "functional")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).resize((size, size), Image.BILINEAR).save(folder / f"cell_{i:04d}.png")
    return root


def plant(root: Path, size: int, n_outliers: int, n_copies: int, other: list[np.ndarray], seed: int):
    """Out-of-domain images and resized copies, written into random class folders. Returns (outlier paths,
    [(original path, copy path)])."""
    rng = np.random.default_rng(seed)
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    originals = sorted(str(p) for f in folders for p in f.glob("*.png"))
    outliers = []
    for k in range(n_outliers):
        folder = folders[rng.integers(len(folders))]
        if k % 2 == 0:  # an image of the other set
            img = Image.fromarray(other[rng.integers(len(other))]).convert("L").resize((size, size))
        else:           # noise, coarse or fine
            cells = int(rng.choice([4, 16, size]))
            img = Image.fromarray(rng.integers(0, 256, (cells, cells), dtype=np.uint8)).resize((size, size))
        path = folder / f"planted_outlier_{k:02d}.png"
        img.save(path)
        outliers.append(str(path))
    copies = []
    for k, idx in enumerate(rng.choice(len(originals), n_copies, replace=False)):
        src = Path(originals[idx])
        scale = float(rng.choice([0.75, 1.5, 2.0]))
        img = Image.open(src)
        copy = src.parent / f"planted_copy_{k:02d}.png"
        img.resize((max(8, int(img.width * scale)), max(8, int(img.height * scale))), Image.BICUBIC).save(copy)
        copies.append((str(src), str(copy)))
    return outliers, copies


def ranking_scores(flagged: set[str], ranked: list[str], planted: set[str]) -> dict:
    top = set(ranked[:len(planted)])
    return {"flagged": len(flagged), "found": len(flagged & planted),
            "recall": round(len(flagged & planted) / max(1, len(planted)), 3),
            "precision": round(len(flagged & planted) / max(1, len(flagged)), 3),
            "top_n_precision": round(len(top & planted) / max(1, len(planted)), 3)}


def pair_scores(groups: list[set[str]], copies: list[tuple[str, str]]) -> dict:
    """Planted pairs found in one group; and how many flagged groups hold no planted pair (the rest of what a person
    would review: real near-duplicates of the set, or false alarms)."""
    found = sum(any(a in g and b in g for g in groups) for a, b in copies)
    planted_members = {p for pair in copies for p in pair}
    other = sum(1 for g in groups if not g & planted_members)
    return {"groups": len(groups), "planted_pairs_found": found, "recall": round(found / max(1, len(copies)), 3),
            "groups_without_a_planted_pair": other}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--elpv", action="store_true")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--image-size", type=int, help="default 32 (digits) or 64 (ELPV)")
    ap.add_argument("--outliers", type=int, default=12)
    ap.add_argument("--copies", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from cleanlab import Datalab
    from levers import write_digits
    from sklearn.datasets import load_digits

    from _common import environment
    from core.config import TrainConfig
    from core.explain.features import outliers, run_features
    from core.explain.leakage import run_duplicates
    from core.jobs.queue import JobManager
    from core.workspace.store import Workspace
    size = args.image_size or (64 if args.elpv else 32)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        if args.elpv:
            write_elpv(root, size)
            other = [(img / 16.0 * 255).astype(np.uint8) for img in load_digits().images]
        else:
            write_digits(root, size=size)
            from elpv_dataset.utils import load_dataset
            other = list(load_dataset()[0][:200])
        planted_outliers, copies = plant(root, size, args.outliers, args.copies, other, args.seed)
        ws = Workspace(Path(tmp) / "ws")
        cfg = TrainConfig(data=str(root), epochs=args.epochs, image_size=size, batch_size=32, **RECIPE)
        jm = JobManager(ws)
        run_id = jm.submit(cfg)
        snap = jm.wait(run_id, timeout=3 * 3600)
        if snap.status != "done":
            raise SystemExit(f"training ended {snap.status}: {snap.error}")
        run = ws.run(run_id)
        rf = run_features(ws, run)
        paths = rf.paths
        planted = set(planted_outliers)

        # Outliers
        studio = outliers(ws, run)
        studio_out = ranking_scores({r["path"] for r in studio if r["far"]}, [r["path"] for r in studio], planted)
        lab = Datalab(data={"label": rf.labels}, label_name="label", verbosity=0)
        lab.find_issues(features=rf.features, issue_types={"outlier": {}, "near_duplicate": {}})
        out = lab.get_issues("outlier")
        lab_ranked = [paths[i] for i in np.argsort(out["outlier_score"].to_numpy(), kind="stable")]
        lab_out = ranking_scores({paths[i] for i in np.flatnonzero(out["is_outlier_issue"].to_numpy())},
                                 lab_ranked, planted)
        # cleanlab's out-of-distribution score (what Datalab's outlier check ranks by) flagged by the studio's rule:
        # beyond the validation part's 95th percentile
        from cleanlab.outlier import OutOfDistribution
        score = OutOfDistribution().fit_score(features=rf.features, verbose=False)
        val = rf.part("val")
        limit = np.percentile(score[val], 5)
        hybrid = ranking_scores({paths[i] for i in np.flatnonzero(score < limit)},
                                [paths[i] for i in np.argsort(score, kind="stable")], planted)

        # Near-duplicates
        studio_dup = {}
        for by in (("hash",), ("features",), ("hash", "features")):
            report = run_duplicates(ws, run, by=by)
            groups = [{m["path"] for m in g["members"]} for g in report["groups"]]
            studio_dup["+".join(by)] = pair_scores(groups, copies)
        near = lab.get_issues("near_duplicate")
        sets = near["near_duplicate_sets"].to_numpy()
        flagged = np.flatnonzero(near["is_near_duplicate_issue"].to_numpy())
        lab_groups = [{paths[i], *(paths[j] for j in sets[i])} for i in flagged]
        lab_dup = pair_scores(_merge(lab_groups), copies)

        # Non-IID: the order of the data
        non_iid = {}
        order = {"folder order": np.arange(len(paths)),
                 "shuffled": np.random.default_rng(args.seed).permutation(len(paths))}
        for name, idx in order.items():
            lab2 = Datalab(data={"label": [rf.labels[i] for i in idx]}, label_name="label", verbosity=0)
            lab2.find_issues(features=rf.features[idx], issue_types={"non_iid": {}})
            non_iid[name] = {"p_value": round(float(lab2.get_info("non_iid")["p-value"]), 4),
                             "score": round(float(lab2.get_issue_summary("non_iid")["score"].iloc[0]), 4)}
    print(json.dumps({
        "benchmark": "datalab_issues", "data": "ELPV" if args.elpv else "scikit-learn digits", "image_size": size,
        "images": len(paths), "epochs": args.epochs, "recipe": RECIPE, "test_acc": snap.test_acc,
        "planted": {"outliers": len(planted_outliers), "resized_copies": len(copies)}, "seed": args.seed,
        "outliers": {"studio": studio_out, "datalab": lab_out, "cleanlab_score_studio_flag": hybrid},
        "near_duplicates": {"studio": studio_dup, "datalab": lab_dup}, "non_iid_datalab": non_iid,
        **environment()}, indent=2))


def _merge(groups: list[set[str]]) -> list[set[str]]:
    """Datalab lists each flagged image with its set: merge overlapping sets into groups, as the studio shows them."""
    merged: list[set[str]] = []
    for g in groups:
        hits = [m for m in merged if m & g]
        for m in hits:
            merged.remove(m)
            g = g | m
        merged.append(g)
    return merged


if __name__ == "__main__":
    main()
