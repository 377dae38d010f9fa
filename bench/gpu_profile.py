"""Where an epoch's time goes on a GPU: the bare training step (batch, fused vs foreach AdamW, a sync per step or
none), the engine's own step, one epoch's checkpoint writes, and a 10-epoch fit on 2,624 generated 300 px images
split into training steps, validation and checkpoint writes.

    python bench/gpu_profile.py > bench/results/gpu_profile-cuda-DATE.json

Written for a CUDA machine (it runs on a CPU too, slowly). Prints progress lines on stderr and one JSON document.
"""
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from _common import environment  # noqa: E402
from core.models.device import describe_device, select_device  # noqa: E402
from core.models.resnet import build_model  # noqa: E402

dev = select_device("auto")
out = {"device": describe_device(dev), **environment()}

def sync_device():
    if dev.type == "cuda":
        torch.cuda.synchronize()


def steps(bs, hw, fused, sync, n=40):
    torch.manual_seed(0)
    model = build_model("resnet18", 2, "none").to(dev).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
    crit = torch.nn.CrossEntropyLoss()
    x = torch.randn(bs, 3, hw, hw, device=dev).to(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (bs,), device=dev)
    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            logits = model(x)
            loss = crit(logits.float(), y)
        loss.backward()
        opt.step()
        if sync:
            return loss.item(), (logits.argmax(1) == y).sum().item()
        return loss.detach(), (logits.argmax(1) == y).sum()
    for _ in range(5):
        step()
    sync_device()
    t = time.perf_counter()
    for _ in range(n):
        step()
    sync_device()
    return round(bs * n / (time.perf_counter() - t))

for bs, hw in [(64, 80), (64, 160), (128, 160), (256, 160), (32, 224)]:
    out[f"{bs}x{hw}"] = {f"{'fused' if f else 'foreach'}-{'sync' if s else 'nosync'}": steps(bs, hw, f, s)
                         for f in (False, True) for s in (True, False)}
    print(bs, hw, out[f"{bs}x{hw}"], file=sys.stderr, flush=True)

# the engine's own step (augmentation included), as the estimate times it
from core.config import TrainConfig
from core.train.estimate import training_images_per_s

for bs in (64, 256):
    cfg = TrainConfig(data="x", image_size=160, batch_size=bs, hflip=True)
    out[f"engine_step_{bs}"] = round(training_images_per_s(cfg, dev, steps=10))
print("engine step", out["engine_step_64"], out["engine_step_256"], file=sys.stderr, flush=True)

# checkpoint cost
from core.models.checkpoint import save_checkpoint

model = build_model("resnet18", 2, "none").to(dev)
opt = torch.optim.AdamW(model.parameters())
opt.zero_grad()
model(torch.randn(2, 3, 64, 64, device=dev)).sum().backward()
opt.step()
d = Path(tempfile.mkdtemp())
for name, kw in [("best", {}), ("last", {"optimizer": opt.state_dict()})]:
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        save_checkpoint(d / f"{name}.pt", model.state_dict(), {"x": 1}, **kw)
        ts.append(time.perf_counter() - t)
    out[f"save_{name}_s"] = [round(v, 3) for v in ts]
print("save", out["save_best_s"], out["save_last_s"], file=sys.stderr, flush=True)

# a fit's timeline on generated 300 px images, 2624 of them (ELPV's count)
from ddp_scaling import generated_data

import core.train.loop as T
from core.runs.life import prepare_run
from core.workspace.store import Workspace

data = generated_data(Path(tempfile.mkdtemp()) / "gen300", 1312, 300)
timers = {"validate": 0.0, "save": 0.0, "train": 0.0}
orig_v, orig_s, orig_t = T.validate, T.save_checkpoints, T.train_one_epoch
def wrap(fn, key):
    def w(*a, **k):
        t = time.perf_counter()
        r = fn(*a, **k)
        timers[key] += time.perf_counter() - t
        return r
    return w
T.validate, T.save_checkpoints, T.train_one_epoch = wrap(orig_v, "validate"), wrap(orig_s, "save"), wrap(orig_t, "train")
ws = Workspace(Path(tempfile.mkdtemp()))
cfg = TrainConfig(data=data, weights="none", epochs=10, image_size=160, batch_size=64, lr=2.8e-3, optimizer="adamw",
                  schedule="onecycle", progressive_start=0.5, normalization="dataset", hflip=True, seed=0)
run = prepare_run(ws, cfg)
t0 = time.perf_counter()
res = T.fit(ws, run)
total = time.perf_counter() - t0
out["fit"] = {"total_s": round(total, 2), **{k: round(v, 2) for k, v in timers.items()},
              "epoch_train_s": [round(r["train_seconds"], 3) for r in res["history"]],
              "epoch_s": [round(r["seconds"], 3) for r in res["history"]]}
print(json.dumps(out, indent=1))
