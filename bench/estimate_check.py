"""How close the Train page's time estimate is: estimate a run on ELPV (core/train/estimate.py), then train it and time it.

    python bench/estimate_check.py [--set image_size=128 --set epochs=3 ...] [--recipe NAME]

The run is the whole thing a user waits for: decoding the images (cold cache), the epochs, the final evaluation.
Prints one JSON document with estimate_s, actual_s and their ratio.
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

import torch  # noqa: E402

from _common import environment  # noqa: E402


def main() -> None:
    from core.config import PRESETS, TrainConfig, parse_overrides
    from core.data.cache import IMAGE_CACHE
    from core.models.device import describe_device
    from core.runs import life as runs
    from core.train.estimate import estimate_run
    from core.train.loop import fit
    from core.workspace.store import Workspace
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="classic", choices=["auto", *PRESETS],
                    help="auto: the studio's default, chosen for ELPV on this machine (its own size and epochs)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    args = ap.parse_args()
    from core.models.device import cpu_threads
    torch.set_num_threads(cpu_threads())
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(Path(tmp) / "ws")
        t = time.perf_counter()
        if args.recipe == "auto":
            from core.train.recipe import auto_recipe
            recipe = auto_recipe(ws, "elpv", fixed=parse_overrides(args.set))
            cfg, est = recipe.config, recipe.estimate
        else:
            values = {**PRESETS[args.recipe], "data": "elpv", "weights": "none", "image_size": 128, "epochs": 3}
            cfg = TrainConfig.from_dict({**values, **parse_overrides(args.set)}).validate()
            est = estimate_run(ws, cfg)
        estimate_took = time.perf_counter() - t
        IMAGE_CACHE._mem.clear()  # the estimate assumes a first run: nothing decoded yet
        run = runs.prepare_run(ws, cfg)
        t = time.perf_counter()
        result = runs.execute(ws, run.id, lambda: fit(ws, run), runs.Reporter())
        actual = time.perf_counter() - t
    print(json.dumps({"benchmark": "estimate_check", "config": {k: getattr(cfg, k) for k in
                      ("image_size", "epochs", "batch_size", "arch", "tta")}, "recipe": args.recipe,
                      "estimate_s": round(est.seconds, 1), "actual_s": round(actual, 1),
                      "ratio_actual_to_estimate": round(actual / est.seconds, 3), "estimate_took_s": round(estimate_took, 1),
                      "images_per_s_measured": round(est.images_per_s, 1), "status": result["status"],
                      "device": describe_device(), **environment()}, indent=2))


if __name__ == "__main__":
    main()
