"""Device and precision: where a run computes (CUDA, then Apple MPS, then the CPU) and in which dtype.

One place decides, so training, evaluation, prediction and the benchmarks agree. bf16 autocast is chosen
on CPUs whose oneDNN build reports bf16 support; whether it is faster there is measured, not assumed
(bench/step_ceiling.py): set `amp="off"` in the config for plain fp32.
"""
from __future__ import annotations

import os

import torch

from .config import ConfigError


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
        if mode in ("auto", "bf16") and cpu_supports_bf16():
            return torch.bfloat16
        return None
    return None  # MPS: fp32 (autocast support there is partial)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The autocast context for a dtype from autocast_dtype (a no-op context for fp32)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def set_cpu_threads(device: torch.device, num_threads: int = 0) -> None:
    if device.type == "cpu":
        torch.set_num_threads(num_threads or os.cpu_count() or 1)


def describe_device(device: torch.device | None = None) -> str:
    device = device or select_device()
    if device.type == "cuda":
        return f"CUDA: {torch.cuda.get_device_name(device)}"
    if device.type == "mps":
        return "Apple MPS"
    return f"CPU ({os.cpu_count()} cores, {'bf16' if cpu_supports_bf16() else 'fp32'})"
