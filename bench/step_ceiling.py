"""The ceiling of precision levers on this machine: a bare ResNet18 training step (random tensors, no data loading)
in fp32 and in bf16 autocast with channels_last, at several batch sizes, and where the bf16 step spends its time.

    python bench/step_ceiling.py [--size 224] [--batches 32,64,100] [--steps 6]

train_speed.py compares whole pipelines; this says how fast any pipeline could go here, since the engine cannot
train faster than its own step. Prints one JSON document.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torchvision  # noqa: E402

from _common import environment  # noqa: E402


def make_step(batch: int, size: int, bf16: bool):
    model = torchvision.models.resnet18(num_classes=2)
    x = torch.randn(batch, 3, size, size)
    if bf16:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,))
    opt = torch.optim.Adam(model.parameters(), 1e-3)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def images_per_s(batch: int, size: int, bf16: bool, steps: int) -> float:
    step = make_step(batch, size, bf16)
    step()  # oneDNN picks and caches its kernels on the first call
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t)


def time_shares(batch: int, size: int) -> dict:
    """Share of CPU time per operator group in two bf16 + channels_last steps (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    step = make_step(batch, size, bf16=True)
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
        step()
    groups = {"convolution_backward": "aten::convolution_backward", "convolution_forward": "aten::mkldnn_convolution",
              "batch_norm": "batch_norm"}
    totals = dict.fromkeys([*groups, "other"], 0.0)
    for ev in prof.key_averages():
        name = next((g for g, key in groups.items() if key in ev.key), "other")
        totals[name] += ev.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    return {k: round(v / whole, 3) for k, v in totals.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batches", default="32,64,100")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per setting")
    args = ap.parse_args()
    from core.models.device import cpu_threads
    torch.set_num_threads(cpu_threads())
    batches = [int(b) for b in args.batches.split(",")]
    fp32 = {b: round(images_per_s(b, args.size, False, args.steps), 1) for b in batches}
    bf16 = {b: round(images_per_s(b, args.size, True, args.steps), 1) for b in batches}
    doc = {
        "benchmark": "step_ceiling",
        "image_size": args.size,
        "fp32_images_per_s": fp32,
        "bf16_channels_last_images_per_s": bf16,
        "ratio": {b: round(bf16[b] / fp32[b], 2) for b in batches},
        "best_ratio": round(max(bf16.values()) / max(fp32.values()), 2),
        "bf16_time_shares": time_shares(batches[0], args.size),
        "cpu_flags": sorted(f for f in _cpu_flags() if f.startswith(("avx512_bf16", "amx"))),
        "threads": torch.get_num_threads(),
        **environment(),
    }
    print(json.dumps(doc, indent=2))


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((set(line.split(":", 1)[1].split()) for line in fh if line.startswith("flags")), set())
    except OSError:
        return set()


if __name__ == "__main__":
    main()
