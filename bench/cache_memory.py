"""The decoded-image cache past its memory bound: training on a generated set of 20,000 images with the cache
bound set below the set's decoded size, so the engine decodes once into a memory-mapped file and trains from it.

    python bench/cache_memory.py [--images 20000] [--size 96] [--cache-mb 256] [--epochs 1]

Prints one JSON document: decoded bytes, the bound, whether the disk-backed cache was used, the in-memory cache
bytes (must stay within the bound), peak RSS of the process, and the training figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from _common import MemoryPeak, environment, status_bytes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--size", type=int, default=96, help="training image size")
    ap.add_argument("--cache-mb", type=float, default=256, help="memory bound of the decoded-image cache")
    ap.add_argument("--epochs", type=int, default=1)
    args = ap.parse_args()
    os.environ["STUDIO_CACHE_MB"] = str(args.cache_mb)  # read when core.data is imported

    from PIL import Image

    from core.config import TrainConfig
    from core.data.cache import IMAGE_CACHE
    from core.models.device import describe_device
    from core.runs.life import prepare_run
    from core.train.loop import fit
    from core.workspace.store import Workspace

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        t = time.perf_counter()
        for c in range(4):
            (root / f"class{c}").mkdir(parents=True)
        for i in range(args.images):
            c = i % 4
            a = rng.integers(0, 60, (128, 128), dtype=np.uint8)
            a[32 * c:32 * c + 32, :] += 120  # a bright band whose position is the class
            Image.fromarray(a, "L").save(root / f"class{c}" / f"{i:05d}.png", compress_level=1)
        gen_s = time.perf_counter() - t
        rss_before = status_bytes("VmHWM") / 2**20
        ws = Workspace(Path(tmp) / "ws")
        cfg = TrainConfig(data=str(root), weights="none", image_size=args.size, epochs=args.epochs,
                          batch_size=64, hflip=False)
        run = prepare_run(ws, cfg)
        t = time.perf_counter()
        with MemoryPeak("RssAnon") as anon:  # the memory-mapped cache pages are file-backed: not counted
            result = fit(ws, run)
        anon_peak = anon.peak / 2**20
        total_s = time.perf_counter() - t
        disk_files = sorted(p.name for p in ws.cache_dir.glob("*.u8")) if ws.cache_dir.exists() else []
        disk_bytes = sum((ws.cache_dir / f).stat().st_size for f in disk_files)
        decoded_bytes = args.images * args.size * args.size * 3
        doc = {
            "benchmark": "cache_memory",
            "images": args.images,
            "image_size": args.size,
            "decoded_mb": round(decoded_bytes / 2**20, 1),
            "cache_bound_mb": args.cache_mb,
            "disk_cache_used": bool(disk_files),
            "disk_cache_mb": round(disk_bytes / 2**20, 1),
            "memory_cache_mb_after": round(IMAGE_CACHE.memory_bytes() / 2**20, 1),
            "within_bound": IMAGE_CACHE.memory_bytes() <= args.cache_mb * 2**20,
            "peak_rss_mb": round(status_bytes("VmHWM") / 2**20, 1),
            "peak_rss_mb_before_training": round(rss_before, 1),
            "peak_anon_rss_mb_training": round(anon_peak, 1),
            "status": result["status"],
            "epochs": len(result["history"]),
            "images_per_s": round(result["history"][-1]["images_per_s"], 1) if result["history"] else None,
            "val_acc": result["history"][-1]["val_acc"] if result["history"] else None,
            "test_acc": result.get("test_acc"),
            "train_and_eval_s": round(total_s, 1),
            "generate_s": round(gen_s, 1),
            "device": describe_device(),
            **environment(),
        }
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
