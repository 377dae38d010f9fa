"""Near-duplicates and split leakage on ELPV (or any dataset): how many groups the perceptual hash finds at each
distance, how many straddle the studio's default split (70/15/15, seed 42), and, with --train, the test accuracy of
one recipe trained on that split and on the split that keeps each group together.

    .venv/bin/python bench/leakage.py [--data elpv] [--distances 0,2,4,6] [--train --recipe "small grayscale
        inspection" --epochs 10] [--out bench/results/leakage-elpv.json]

Prints one JSON document (and writes it to --out).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import emit, environment  # noqa: E402


def split_report(ds, split, groups) -> dict:
    part_of = {i: p for p, idx in split.items() for i in idx}
    straddling = [g for g in groups if len({part_of[i] for i in g}) > 1]
    with_test = [g for g in straddling if "test" in {part_of[i] for i in g}]
    return {"n_straddling": len(straddling), "n_straddling_with_test": len(with_test),
            "test_images_with_a_twin_outside_test": sum(
                1 for g in with_test for i in g if part_of[i] == "test")}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="elpv")
    ap.add_argument("--distances", default="0,2,4,6")
    ap.add_argument("--train", action="store_true", help="also train the recipe on both splits (minutes)")
    ap.add_argument("--recipe", default="small grayscale inspection")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--out")
    args = ap.parse_args()

    from core.config import PRESETS, TrainConfig
    from core.data.duplicates import dataset_duplicate_groups
    from core.data.sources import load_dataset
    from core.data.split import stratified_split

    ds = load_dataset(args.data)
    out = {"bench": "leakage", "data": args.data, "n_images": len(ds.samples), "env": environment(),
           "default_split": "stratified 70/15/15, split_seed 42", "by_distance": {}}
    today = stratified_split(ds, 0.15, 0.15, 42)
    for d in [int(x) for x in args.distances.split(",")]:
        t0 = time.perf_counter()
        groups = dataset_duplicate_groups(ds, d)
        seconds = time.perf_counter() - t0
        sizes = sorted((len(g) for g in groups), reverse=True)
        out["by_distance"][d] = {
            "n_groups": len(groups), "n_images_in_groups": sum(sizes), "largest_groups": sizes[:5],
            "n_labels_disagree": sum(len({ds.samples[i].label for i in g}) > 1 for g in groups),
            "seconds": round(seconds, 2), **split_report(ds, today, groups),
            "after_group_split": split_report(ds, stratified_split(ds, 0.15, 0.15, 42, groups), groups)}
    if args.train:
        from core.runs.life import prepare_run
        from core.train.loop import fit
        from core.workspace.store import Workspace
        ws = Workspace(Path(tempfile.mkdtemp(prefix="leakage-")) / "ws")
        out["training"] = {"recipe": args.recipe, "epochs": args.epochs, "workspace": str(ws.root)}
        for name in ("none", "duplicates"):
            cfg = TrainConfig(**{**TrainConfig(data=args.data).to_dict(), **PRESETS[args.recipe],
                                 "epochs": args.epochs, "split_groups": name})
            run = prepare_run(ws, cfg)
            t0 = time.perf_counter()
            result = fit(ws, run)
            out["training"][name] = {"run_id": run.id, "test_acc": result.get("test_acc"), "best_val_acc": result["best_val_acc"],
                                     "minutes": round((time.perf_counter() - t0) / 60, 1),
                                     "split": {p: len(v) for p, v in run.split().items() if p in ("train", "val", "test")}}
    return emit(out, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
