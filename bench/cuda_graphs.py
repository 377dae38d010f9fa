"""The training step eager and replayed as a CUDA graph (core/train/graphs.py, TrainConfig.cuda_graphs): the engine's
step in images/s at ELPV's shapes, and the same short fit on generated images with graphs on and off (time per
epoch, losses and accuracies side by side: graphs must change the speed, not the training).

    python bench/cuda_graphs.py > bench/results/cuda_graphs-cuda-DATE.json

For a CUDA machine: elsewhere both columns are the eager step (graphs are CUDA-only). Progress on stderr, one JSON
document on stdout.
"""
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import environment  # noqa: E402
from core.config import TrainConfig  # noqa: E402
from core.models.device import describe_device, select_device  # noqa: E402
from core.train.estimate import training_images_per_s  # noqa: E402

dev = select_device("auto")
out = {"benchmark": "cuda_graphs", "device": describe_device(dev), **environment(), "step_images_per_s": {}}

for bs, size in [(64, 80), (64, 128), (64, 160), (128, 160), (32, 224)]:
    row = {}
    for graphs in (False, True):
        cfg = TrainConfig(data="x", image_size=size, batch_size=bs, hflip=True, optimizer="adamw", cuda_graphs=graphs)
        row["graphed" if graphs else "eager"] = round(training_images_per_s(cfg, dev, steps=20))
    row["ratio"] = round(row["graphed"] / row["eager"], 2)
    out["step_images_per_s"][f"{bs}x{size}"] = row
    print(bs, size, row, file=sys.stderr, flush=True)

from ddp_scaling import generated_data  # noqa: E402

import core.train.loop as T
from core.runs.life import prepare_run  # noqa: E402
from core.workspace.store import Workspace  # noqa: E402

data = generated_data(Path(tempfile.mkdtemp()) / "gen", 640, 160)
out["fit"] = {}
for graphs in (False, True):
    ws = Workspace(Path(tempfile.mkdtemp()))
    cfg = TrainConfig(data=data, weights="none", epochs=8, image_size=128, batch_size=64, lr=2e-3, optimizer="adamw",
                      schedule="onecycle", progressive_start=0.5, normalization="dataset", hflip=True, seed=0,
                      cuda_graphs=graphs)
    run = prepare_run(ws, cfg)
    t0 = time.perf_counter()
    res = T.fit(ws, run)
    key = "graphed" if graphs else "eager"
    out["fit"][key] = {"total_s": round(time.perf_counter() - t0, 2), "test_acc": res.get("test_acc"),
                       "epoch_train_s": [round(r["train_seconds"], 3) for r in res["history"]],
                       "train_loss": [round(r["train_loss"], 4) for r in res["history"]],
                       "val_loss": [round(r["val_loss"], 4) for r in res["history"]],
                       "val_acc": [round(r["val_acc"], 4) for r in res["history"]]}
    print(key, out["fit"][key], file=sys.stderr, flush=True)
print(json.dumps(out, indent=1))
