"""Device and precision: where a run computes (CUDA, then Apple MPS, then the CPU) and in which dtype.

One place decides, so training, evaluation, prediction and the benchmarks agree. On a CPU, "auto" uses bf16
autocast only where it is measured faster: a CPU flag is not enough (an AVX-512 BF16 Xeon without AMX trains
at 0.98x of fp32 in bf16, an EPYC with the same flag at 2.4x). The measurement is a few timed ResNet18 training
steps in each precision, taken once per machine (CPU model, torch version, threads) and kept in a small JSON
file, so every process on the machine decides alike. `amp="bf16"` asks for bf16 regardless, `"off"` for fp32.
"""
from __future__ import annotations

import json
import os
import platform
import threading
import time
from pathlib import Path

import torch

from core.config import ConfigError
from core.workspace.files import write_json_atomic

BF16_MIN_SPEEDUP = 1.1  # below this, bf16's rounding is not worth it


def select_device(pref: str = "auto") -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device", "CUDA was requested but no CUDA GPU is available")
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if pref == "mps" or (pref == "auto" and mps is not None and mps.is_available()):
        if mps is None or not mps.is_available():
            raise ConfigError("device", "MPS was requested but is not available")
        return torch.device("mps")
    return torch.device("cpu")


def cpu_supports_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def autocast_dtype(device: torch.device, mode: str = "auto") -> torch.dtype | None:
    """The autocast dtype for this device, or None for plain fp32."""
    if mode == "off":
        return None
    if device.type == "cuda":
        if mode == "fp16":
            return torch.float16
        if mode == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    if device.type == "cpu":
        if mode == "bf16" and cpu_supports_bf16():
            return torch.bfloat16
        if mode == "auto" and cpu_bf16_measurement()["bf16"]:
            return torch.bfloat16
        return None
    return None  # MPS: fp32 (autocast support there is partial)


# ----------------------------------------------------------------------------------------------------
# Measuring whether bf16 pays on this CPU


def precision_cache_path() -> Path:
    return Path(os.environ.get("STUDIO_PRECISION_CACHE", "~/.cache/image-studio/precision.json")).expanduser()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The flags that decide how fast bf16 runs (AVX-512 BF16 instructions, AMX tiles), kept in the cache key.
PRECISION_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_signature() -> str:
    """Family, model, stepping and the precision flags from /proc/cpuinfo ("" elsewhere). A virtual machine's
    model name can be as bare as "AMD EPYC" for several generations, one where bf16 trains 2.4x faster than fp32
    and another at 1.15x: the name alone would hand one machine's measurement to the other."""
    fields, flags = {}, set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                name, _, value = line.partition(":")
                name = name.strip()
                if name in ("cpu family", "model", "stepping") and name not in fields:
                    fields[name] = value.strip()
                elif name == "flags":
                    flags = set(value.split())
                    break  # the first processor's block is enough
    except OSError:
        return ""
    ids = " ".join(f"{k.split()[-1]} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields)
    return f"{ids}; {' '.join(f for f in PRECISION_FLAGS if f in flags) or 'no avx2'}"


def _machine_key() -> str:
    return f"{cpu_name()} ({cpu_signature()}) | torch {torch.__version__} | {torch.get_num_threads()} threads"


def time_training_steps(size: int = 96, batch: int = 16, steps: int = 3) -> dict:
    """Seconds per ResNet18 training step (random data, channels_last) in fp32 and in bf16 autocast.

    Leaves torch's global random state as it found it: the first run on a machine measures inside build_trainer,
    after the run's own torch.manual_seed, and without this its initial weights differed from the same seed's in
    any later process (seen: the same config scoring 90.5% and 93.1% on digits)."""
    with torch.random.fork_rng(devices=[]):
        return _time_training_steps(size, batch, steps)


def _time_training_steps(size: int, batch: int, steps: int) -> dict:
    import torchvision
    out = {}
    for name, dtype in (("fp32_s", None), ("bf16_s", torch.bfloat16)):
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=2).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 2, (batch,))
        times = []
        for i in range(steps + 1):  # the first step picks and caches oneDNN's kernels: not timed
            t = time.perf_counter()
            with autocast(torch.device("cpu"), dtype):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i:
                times.append(time.perf_counter() - t)
        out[name] = min(times)
    return out


_measured: dict[str, dict] = {}
_measure_lock = threading.Lock()


def cpu_bf16_measurement() -> dict:
    """{"bf16": use it?, "speedup": fp32 time / bf16 time, ...} for this CPU: measured once per machine (about
    3 s) and read from the cache file afterwards. A CPU without bf16 support is not measured."""
    if not cpu_supports_bf16():
        return {"bf16": False, "speedup": None, "reason": "no bf16 support in this CPU's oneDNN"}
    key = _machine_key()
    with _measure_lock:
        if key not in _measured:
            path = precision_cache_path()
            try:
                known = json.loads(path.read_text())
            except (OSError, ValueError):
                known = {}
            if key not in known:
                t = time_training_steps()
                speedup = t["fp32_s"] / t["bf16_s"]
                known[key] = {**t, "speedup": round(speedup, 3), "bf16": speedup >= BF16_MIN_SPEEDUP,
                              "measured": time.strftime("%Y-%m-%d %H:%M")}
                try:
                    write_json_atomic(path, known)
                except OSError:
                    pass  # a read-only home: this process still decides from its own measurement
            _measured[key] = known[key]
        return _measured[key]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The autocast context for a dtype from autocast_dtype (a no-op context for fp32)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def cpu_threads() -> int:
    """The CPU threads torch may use in this process: OMP_NUM_THREADS when it is set (torch's own setting, which a
    user sharing the machine sets), else the cores this process may run on (its affinity: a container or taskset
    can give it fewer than the machine has)."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        pass
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def set_cpu_threads(device: torch.device, num_threads: int = 0) -> None:
    if device.type == "cpu":
        torch.set_num_threads(num_threads or cpu_threads())


def describe_device(device: torch.device | None = None) -> str:
    device = device or select_device()
    if device.type == "cuda":
        return f"CUDA: {torch.cuda.get_device_name(device)}"
    if device.type == "mps":
        return "Apple MPS"
    m = cpu_bf16_measurement()
    if m["speedup"] is None:
        return f"CPU ({os.cpu_count()} cores, fp32)"
    used = "bf16" if m["bf16"] else "fp32"
    return f"CPU ({os.cpu_count()} cores, {used}: bf16 measured at {m['speedup']:.2f}x the speed of fp32)"
