"""Why progressive resizing's first epochs validate low, and what validating otherwise would show.

The auto recipe trains its first epochs on smaller images (progressive resizing) and validates every epoch at the
run's full size, which those weights and their batch-norm statistics have not seen yet. This bench trains the
auto recipe on ELPV 2-class (the paper's split; bench/time_to_accuracy.py's studio side) and, after each
epoch that trained below the full size, scores the same weights on the validation part two more ways:
- `val_at_train_size`: the validation images resized to the epoch's training size (as the training batches are:
  the cached full-size pixels, bilinear with antialias);
- `val_bn_full`: at the full size, on a copy whose batch-norm statistics were recomputed at the full size from
  `--bn-images` training images (the FixRes remedy: Touvron et al. 2019).
Training is untouched (the extra passes change no weights and no random draw), so the `val_acc` column is the
engine's curve for the same seed, to the digit. The wall clock includes the extra passes (`s_extra` per epoch).

    python bench/progressive_validation.py --precision fp32 --seed 0 [--out FILE]
    python bench/progressive_validation.py --quick      # a subset and 4 epochs: checks that it runs
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from time_to_accuracy import cpu_flags, paper_split, run_studio, subset  # noqa: E402

import core.train.loop as train
from _common import emit, environment  # noqa: E402
from core.models.device import cpu_name  # noqa: E402
from core.train.schedule import train_hw_at  # noqa: E402


def resized_batches(batches, hw):
    """t.data.batches with every N x H x W x 3 uint8 batch resized to hw, as train_one_epoch resizes its batches."""
    def gen(idx, bs, device, check=None):
        for x in batches(idx, bs, device, check):
            small = nn.functional.interpolate(x.permute(0, 3, 1, 2).float(), size=hw, mode="bilinear",
                                              antialias=True, align_corners=False)
            yield small.round().clamp(0, 255).to(x.dtype).permute(0, 2, 3, 1).contiguous()
    return gen


def with_full_size_statistics(t, n_images: int) -> nn.Module:
    """A copy of the trained weights whose batch-norm statistics are the plain mean over n_images training images
    at the full size."""
    model = copy.deepcopy(t.model)
    with train.autocast(t.device, t.amp):  # SWA's recomputation in core/train/averaging.py calls the same
        torch.optim.swa_utils.update_bn(
            (t.normalizer(x) for x in t.data.batches(t.data.parts["train"][:n_images], 64, t.device)), model)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", choices=["auto", "fp32"], default="auto")
    ap.add_argument("--bn-images", type=int, default=512)
    ap.add_argument("--out", default="", help="also write the JSON here")
    ap.add_argument("--quick", action="store_true", help="a 256-image subset and 4 epochs: checks the bench runs")
    args = ap.parse_args()

    rows: list[dict] = []
    validate, train_one_epoch = train.validate, train.train_one_epoch
    epoch_now = [0]

    def train_and_remember(t, epoch, reporter):
        epoch_now[0] = epoch
        return train_one_epoch(t, epoch, reporter)

    def validate_and_score(t, part, reporter, model=None):
        out = validate(t, part, reporter, model)
        if part != "val" or model is not None:
            return out
        hw = train_hw_at(t.cfg, epoch_now[0])
        row = {"epoch": epoch_now[0], "train_size": hw[0], "val_acc": out["val_acc"]}
        if hw != t.cfg.input_hw:
            t0 = time.perf_counter()
            row["val_bn_full"] = validate(t, part, reporter, with_full_size_statistics(t, args.bn_images))["val_acc"]
            full_batches = t.data.batches
            t.data.batches = resized_batches(full_batches, hw)
            try:
                row["val_at_train_size"] = validate(t, part, reporter)["val_acc"]
            finally:
                t.data.batches = full_batches
            row["s_extra"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        return out

    # The seams: fit() calls train_one_epoch() then validate() once an epoch (weight averaging off).
    train.train_one_epoch, train.validate = train_and_remember, validate_and_score
    split = paper_split(False, 2019)
    if args.quick:
        split = subset(split, {"train": 256, "val": 96, "test": 96}, 0)
    with tempfile.TemporaryDirectory() as tmp:
        studio = run_studio(split, Path(tmp), 1.01, args.precision, ["epochs=4"] if args.quick else [], args.seed)
    doc = {"benchmark": "progressive_validation", "seed": args.seed, "bn_images": args.bn_images, "cpu": cpu_name(),
           "cpu_flags": cpu_flags(), **environment(),
           "epochs": rows, "studio": {k: v for k, v in studio.items() if k != "recipe"}}
    emit(doc, args.out)


if __name__ == "__main__":
    main()
