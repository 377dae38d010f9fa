"""Deciding with the model on ELPV 2-class: calibration, a 10:1 cost threshold and the review band at 95%.

Trains the studio's auto recipe on the paper's split (bench/elpv_accuracy.py's; seeds as asked), evaluates it (which
fits the temperature on the validation part), then chooses, on validation, the threshold for "defective" with a
missed defect costing 10 and a false alarm 1, and the band that sends the least certain cells to a person until the
rest reach 95% accuracy. Every figure is on the test part. Prints one JSON document; `--run ID --workspace DIR`
scores a run trained before instead of training.

    .venv/bin/python bench/decide_elpv.py [--seeds 0 1 2] [--precision fp32]
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
import torch  # noqa: E402
from elpv_accuracy import paper_split  # noqa: E402
from time_to_accuracy import cpu_flags, run_studio  # noqa: E402

from _common import environment  # noqa: E402

COSTS = {"positive": "defective", "cost_miss": 10.0, "cost_false_alarm": 1.0}
TARGET = 0.95


def score(run) -> dict:
    from core.decide.stored import decide_run
    cal = run.calibration()
    r = decide_run(run, **COSTS, target_accuracy=TARGET, save=False)
    return {"run_id": run.id, "test_acc": run.evaluation()["accuracy"], "temperature": cal["temperature"],
            "ece_before": cal["ece_before"], "ece_after": cal["ece_after"], "nll_before": cal["nll_before"],
            "nll_after": cal["nll_after"], "threshold": r["threshold"], "test_cost": r["test_cost"],
            "test_cost_argmax": r["test_cost_argmax"], "recall_rule": r["test"]["rule"]["recall"],
            "recall_argmax": r["test"]["argmax"]["recall"], "precision_rule": r["test"]["rule"]["precision"],
            "precision_argmax": r["test"]["argmax"]["precision"], "band": r["band"], "coverage": r["coverage"],
            "band_accuracy": r["band_accuracy"], "n_test": r["test"]["n"], "val_coverage": r["val"]["coverage"],
            "val_band_accuracy": r["val"]["band_accuracy"], "val_band_interval": r["val_band_interval"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--precision", choices=["auto", "fp32"], default="auto")
    ap.add_argument("--run", help="score this run instead of training (with --workspace)")
    ap.add_argument("--workspace")
    ap.add_argument("--keep", help="train in this folder and keep it (score the runs again later with --run)")
    args = ap.parse_args()
    from core.models.device import cpu_name, cpu_threads
    from core.workspace.store import Workspace
    torch.set_num_threads(cpu_threads())
    doc = {"benchmark": "decide_elpv", "data": "ELPV 2-class, paper split", "costs": COSTS,
           "target_accuracy": TARGET, "cpu": cpu_name(), "cpu_flags": cpu_flags(), **environment(), "runs": []}
    if args.run:
        doc["runs"].append(score(Workspace(args.workspace).run(args.run)))
    else:
        split = paper_split(False, 2019)
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(args.keep) / f"seed{seed}" if args.keep else Path(tmp)
                trained = run_studio(split, folder, target=1.01, precision=args.precision, overrides=[],
                                     seed=seed)
                ws = Workspace(folder / "ws")
                run = ws.run(ws.list_runs()[0]["id"])
                doc["runs"].append({"seed": seed, "precision": trained["precision"], "workspace": str(ws.root),
                                    "train_minutes": trained["minutes_total"], **score(run)})
    for key in ("ece_before", "ece_after", "test_cost", "test_cost_argmax", "coverage", "band_accuracy", "test_acc"):
        vals = [r[key] for r in doc["runs"] if r[key] is not None]
        doc[f"mean_{key}"] = float(np.mean(vals)) if vals else None
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
