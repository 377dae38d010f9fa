"""Would test-time views in the per-epoch validation help the auto recipe reach the time-to-accuracy target?

bench/time_to_accuracy.py selects the studio's checkpoint on validation without test-time augmentation (TTA). This
bench trains the same auto recipe (ELPV 2-class, the paper's split, seeds as given) and, after each epoch's usual
validation, also scores the trained weights on the validation and test parts with no TTA, with the image and its
horizontal flip ("hflip", the one flip the auto recipe trains with) and with the image and its two flips ("flips",
the studio's TTA views). So each selection rule (pick the epoch on validation with these views) can be read off
the same runs, paired: the epoch it picks, whether it reaches the classic recipe's best validation accuracy, and the
test accuracy at that epoch. Training itself is untouched: the extra passes change no weights and no random draw,
so the "none" validation column is bench/time_to_accuracy.py's curve for the same seed, to the digit.

The wall clock here includes the extra passes; their seconds are in the JSON (`s_*` per epoch), so that a rule's
real time to the target is the epoch's minutes minus the passes it would not run.

    python bench/time_to_accuracy.py ...   # the studio's curve alone
    python bench/tta_selection.py --seeds 0,1,2 --out bench/results/tta_selection-cpu-DATE.json
    python bench/tta_selection.py --quick --seeds 0   # a subset, 3 epochs: checks that it runs
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from time_to_accuracy import paper_split, run_studio, subset  # noqa: E402

import core.train.loop as train
from _common import emit, environment  # noqa: E402
from core.infer.classifier import forward_probs  # noqa: E402

# Views of an N x H x W x 3 uint8 batch. A flip commutes with the per-channel normalization, so each view goes
# through the one inference path (core.inference.forward_probs) as it is.
VIEWS = {"none": lambda x: [x], "hflip": lambda x: [x, x.flip(2)], "flips": lambda x: [x, x.flip(2), x.flip(1)]}


def part_accuracy(t, part: str, views: str) -> float:
    """Accuracy of the trained weights on a split part, probabilities averaged over the views (as TTA does)."""
    idx = t.data.parts[part]
    probs = []
    for x in t.data.batches(idx, 64, t.device, None):
        each = VIEWS[views](x)
        probs.append((sum(forward_probs(t.model, v, t.normalizer, t.amp) for v in each) / len(each)).cpu())
    p = torch.cat(probs).numpy().astype(np.float64)
    return train.accuracy_and_loss(p, t.data.labels[idx])[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--classic-from", default=str(ROOT / "bench/results/time_to_accuracy-classic-cpu-2026-11-23.json"))
    ap.add_argument("--precision", choices=["auto", "fp32"], default="auto")
    ap.add_argument("--out", default="", help="also write the JSON here")
    ap.add_argument("--quick", action="store_true", help="a 256-image subset and 3 epochs: checks the bench runs")
    args = ap.parse_args()

    rows: list[dict] = []
    validate = train.validate

    def validate_and_score(t, part, reporter, model=None):
        out = validate(t, part, reporter, model)
        row = {}
        for p in ("val", "test"):
            for v in VIEWS:
                t0 = time.perf_counter()
                row[f"{p}_{v}"] = part_accuracy(t, p, v)
                row[f"s_{p}_{v}"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        return out

    train.validate = validate_and_score  # the one seam: fit() calls validate() once an epoch (EMA off)
    split = paper_split(False, 2019)
    if args.quick:
        split = subset(split, {"train": 256, "val": 96, "test": 96}, 0)
    target = json.loads(Path(args.classic_from).read_text())["classic"]["best_val_acc"]
    doc = {"benchmark": "tta_selection", "target_val_acc": target, **environment(), "seeds": {}}
    for seed in [int(s) for s in args.seeds.split(",")]:
        rows.clear()
        with tempfile.TemporaryDirectory() as tmp:
            studio = run_studio(split, Path(tmp), target, args.precision,
                                ["epochs=3"] if args.quick else [], seed)
        rules = {}
        for v in VIEWS:  # first epoch with the best validation accuracy under these views (ties: the earlier)
            best = max(range(len(rows)), key=lambda i: (rows[i][f"val_{v}"], -i))
            reached = next((i for i, r in enumerate(rows) if r[f"val_{v}"] >= target), None)
            rules[v] = {"best_epoch": best + 1, "best_val": rows[best][f"val_{v}"],
                        "test_at_best": rows[best][f"test_{v}"],
                        "epoch_at_target": reached + 1 if reached is not None else None}
        doc["seeds"][seed] = {"rules": rules, "epochs": list(rows),
                              "studio": {k: v for k, v in studio.items() if k not in ("recipe", "curve")}}
        print(f"seed {seed}: " + json.dumps(rules), file=sys.stderr, flush=True)
    emit(doc, args.out)


if __name__ == "__main__":
    main()
