"""Test-time views on trained runs: for each run in a workspace, its best checkpoint scored on the validation and
the test part with the image alone, its flips, and its 8 flips and quarter turns; the views validation would
choose (cfg.tta_views="auto") and what that choice scores on the test part.

    python bench/elpv_accuracy.py --task 2 --seeds 0,1,2 --workspace /tmp/ws ...   # keeps its runs
    python bench/tta_views.py --workspace /tmp/ws

Prints one JSON document.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

VIEWS = ("none", "flips", "dihedral")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workspace", required=True)
    args = ap.parse_args()

    import torch

    from core.data.split import samples_from_split
    from core.infer.classifier import Classifier
    from core.models.device import describe_device
    from core.train.loop import accuracy_and_loss
    from core.workspace.store import Workspace

    ws = Workspace(Path(args.workspace))
    per_run = []
    for run in sorted((ws.run(r["id"]) for r in ws.list_runs()), key=lambda r: r.id):
        if not run.best_path.exists():
            continue
        clf = Classifier.from_checkpoint(run.best_path)
        split = run.split()
        scores = {}
        for part in ("val", "test"):
            samples = samples_from_split(split, part)
            x = torch.from_numpy(np.stack([clf.image(s.path) for s in samples]))
            y = np.array([s.label for s in samples])
            for views in VIEWS:
                clf.tta, clf.tta_views = views != "none", views if views != "none" else "flips"
                p = np.concatenate([clf.probs(x[i:i + 64]) for i in range(0, len(x), 64)])
                acc, loss = accuracy_and_loss(p, y)
                scores.setdefault(views, {})[part] = {"acc": round(acc, 4), "loss": round(loss, 4)}
        chosen = VIEWS[0]
        for views in VIEWS[1:]:  # core.train.choose_tta_views' rule: accuracy, then loss; ties to fewer views
            v, c = scores[views]["val"], scores[chosen]["val"]
            if v["acc"] > c["acc"] or (v["acc"] == c["acc"] and v["loss"] < c["loss"]):
                chosen = views
        per_run.append({"run": run.id, "seed": run.config().seed, "scores": scores, "chosen_on_val": chosen,
                        "test_acc_chosen": scores[chosen]["test"]["acc"]})
        print(json.dumps(per_run[-1]), file=sys.stderr, flush=True)
    summary = {views: round(float(np.mean([r["scores"][views]["test"]["acc"] for r in per_run])), 4)
               for views in VIEWS}
    print(json.dumps({"benchmark": "tta_views", "workspace": args.workspace, "runs": len(per_run),
                      "test_acc_mean": summary,
                      "test_acc_mean_chosen_on_val": round(float(np.mean([r["test_acc_chosen"] for r in per_run])), 4),
                      "per_run": per_run, "device": describe_device(torch.device("cpu")),
                      "date": time.strftime("%Y-%m-%d")}, indent=2))


if __name__ == "__main__":
    main()
