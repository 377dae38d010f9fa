"""Where the studio's time goes from Start to the end of a run on ELPV (bench/time_to_accuracy.py's studio side,
twice in one process: the first pays CUDA's start, the second shows a warm process): the auto recipe's facts and
timings, the trainer's build (decoding, dataset statistics, model), training, validation, checkpoint writes and
the final evaluation, each summed over the run, and the estimate shown before Start.

    python bench/studio_phases.py [--set FIELD=VALUE ...]   (--set: as bench/time_to_accuracy.py's, e.g. cuda_graphs=false)
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
T = {}


def wrap(mod, name):
    """Sum the seconds spent in mod.name (looked up by its callers at call time)."""
    fn = getattr(mod, name)

    def timed(*a, **k):
        t = time.perf_counter()
        r = fn(*a, **k)
        T[name] = round(T.get(name, 0) + time.perf_counter() - t, 3)
        return r
    setattr(mod, name, timed)


import core.train.estimate as E
import core.train.loop as TR
import core.train.recipe as R

for n in ("_timed_training_steps", "decode_seconds_per_image", "checkpoint_write_seconds"):
    wrap(E, n)
for n in ("measure", "machine_facts", "image_facts"):
    wrap(R, n)
for n in ("build_trainer", "train_one_epoch", "validate", "evaluate_run", "save_checkpoints", "channel_stats",
          "build_model", "load_run_data"):
    wrap(TR, n)
import time_to_accuracy as TA  # noqa: E402
from elpv_accuracy import paper_split  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a field of the recipe")
args = ap.parse_args()
split = paper_split(False, 2019)
for rep in range(2):
    T.clear()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        res = TA.run_studio(split, Path(tmp), 0.7932, "auto", args.set, 0)
        T["total"] = round(time.perf_counter() - t, 2)
    T["first_epoch_at_s"] = round(res["curve"][0]["minutes"] * 60, 2)
    T["estimate_s"] = round(res["estimate_minutes"] * 60, 2)
    print(json.dumps({"process": "first" if rep == 0 else "warm", "set": args.set, **T}), flush=True)
