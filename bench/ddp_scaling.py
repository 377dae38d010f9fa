"""Multi-device scaling: training images/s with 1, 2, 4... processes (DistributedDataParallel through the engine's
own launcher, core/train/distributed.py), on what this machine has: GPUs (NCCL, one process each) or the CPU (Gloo, the
cores shared out among the processes).

    python bench/ddp_scaling.py                          # generated images, 2 epochs per process count
    python bench/ddp_scaling.py --data elpv --image-size 128 --epochs 2
    python bench/ddp_scaling.py --procs 1,2,4 --batch-size 64

Each count trains the same run (same data, split, batch size and learning rate: N processes split every batch) in
a fresh training process, as the studio does; the figure is the mean images/s of the epochs after the first (the
first includes decoding and warm-up). Prints one JSON document: per count images_per_s, speedup over one process
and scaling efficiency (speedup / N), with the CPU, its precision support and the device.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import environment  # noqa: E402


def generated_data(root: Path, n_per_class: int, size: int) -> str:
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for c, name in enumerate(("blank", "dot")):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            a = (rng.random((size, size, 3)) * 90 + 20).astype(np.uint8)
            if c:
                y, x = rng.integers(0, size - size // 3, 2)
                a[y:y + size // 3, x:x + size // 3] = 240
            Image.fromarray(a).save(d / f"{i:04d}.png")
    return str(root)


def default_counts() -> list[int]:
    import torch
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
    else:
        n = os.cpu_count() or 1
    counts, c = [], 1
    while c <= n:
        counts.append(c)
        c *= 2
    return counts


def train_once(ws_root: Path, data: str, procs: int, args) -> dict:
    from core.config import TrainConfig
    from core.jobs.worker import child_env, job_command
    from core.runs.life import prepare_run
    from core.workspace.store import Workspace
    ws = Workspace(ws_root)
    cfg = TrainConfig(data=data, weights="none", epochs=args.epochs, image_size=args.image_size,
                      batch_size=args.batch_size, devices=procs, hflip=True, seed=0, amp=args.amp)
    run = prepare_run(ws, cfg)
    t0 = time.perf_counter()
    out = subprocess.run(job_command(run.id, False, ws.root), cwd=ROOT, env=child_env(), capture_output=True,
                         text=True)
    wall = time.perf_counter() - t0
    row = ws.run_row(run.id)
    if out.returncode != 0 or row["status"] != "done":
        raise SystemExit(f"{procs} processes: {row['status']}: {row['error']}\n{out.stderr[-2000:]}")
    history = run.history()
    warm = history[1:] or history
    return {"processes": procs, "images_per_s": round(sum(r["images_per_s"] for r in warm) / len(warm), 1),
            "epoch_seconds": [round(r["seconds"], 2) for r in history], "wall_s": round(wall, 1),
            "best_val_acc": row["best_val_acc"], "train_images": len(run.split()["train"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="generated", help="generated (default), elpv, or a folder of class folders")
    ap.add_argument("--procs", default="", help="process counts, e.g. 1,2,4 (default: powers of 2 up to the GPUs, "
                                                "or the CPU cores)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--images-per-class", type=int, default=400, help="for --data generated")
    ap.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"))
    args = ap.parse_args()

    from core.models.device import cpu_name, describe_device, select_device
    counts = [int(c) for c in args.procs.split(",") if c.strip()] or default_counts()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = (generated_data(tmp / "data", args.images_per_class, args.image_size)
                if args.data == "generated" else args.data)
        rows = [train_once(tmp / f"ws{n}", data, n, args) for n in counts]
    base = rows[0]["images_per_s"] if rows and rows[0]["processes"] == 1 else None
    for r in rows:
        if base:
            r["speedup"] = round(r["images_per_s"] / base, 2)
            r["efficiency"] = round(r["images_per_s"] / (base * r["processes"]), 2)
    from time_to_accuracy import cpu_flags
    doc = {"benchmark": "ddp_scaling", "data": args.data, "image_size": args.image_size,
           "batch_size": args.batch_size, "epochs": args.epochs, "cpu": cpu_name(), "cpu_flags": cpu_flags(),
           "device": describe_device(select_device("auto")),
           "backend": "nccl" if select_device("auto").type == "cuda" else "gloo", "results": rows, **environment()}
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
