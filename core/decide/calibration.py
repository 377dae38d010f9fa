"""Calibrated probabilities: one temperature T fitted on the validation part by minimizing the negative
log-likelihood (Guo et al. 2017), and the reliability of probabilities (ECE, reliability bins).

T is applied to the probabilities the one inference path gives, softmax(log p / T), which is the logits divided by
T for a plain forward pass and stays defined for the flip-averaged (TTA) probabilities. Everything in core/decide is
arithmetic on probability rows (numpy only, no torch: the ONNX predictor uses it too).
"""
from __future__ import annotations

import math

import numpy as np

EPS = 1e-12
ECE_BINS = 15  # equal-width confidence bins, as in Guo et al.
MIN_VAL_FOR_CALIBRATION = 10  # fewer validation images than this: T stays 1 (a fit on a handful is noise)


# --- calibration ---------------------------------------------------------------------------------------------

def calibrate(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T) of each row: T > 1 softens over-confident probabilities, T < 1 sharpens. Argmax is kept."""
    probs = np.asarray(probs, dtype=np.float64)
    if temperature == 1.0 or probs.size == 0:
        return probs
    z = np.log(np.clip(probs, EPS, 1.0)) / temperature
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes."""
    y = np.asarray(y, dtype=np.int64)
    return float(-np.log(np.clip(probs[np.arange(len(y)), y], EPS, 1.0)).mean()) if len(y) else float("nan")


def fit_temperature(probs: np.ndarray, y: np.ndarray, low: float = 0.05, high: float = 20.0) -> float:
    """The T in [low, high] minimizing the validation NLL of calibrate(probs, T) (Guo et al. 2017). The NLL is
    convex in 1/T, so a golden-section search over log T finds its minimum. 1.0 when there are too few images.

    When the model gets every validation image right, the NLL falls without end as T -> 0: nothing shows the model
    over-confident, and nothing bounds how certain it should become. Then T never softens and sharpens only as
    far as Platt's (1999) targets allow, 1 - 1/(n+2) on the true class: n right answers in a row justify about that
    much confidence, not certainty."""
    y = np.asarray(y, dtype=np.int64)
    n, k = len(y), (probs.shape[1] if np.ndim(probs) == 2 else 0)
    if n < MIN_VAL_FOR_CALIBRATION or k < 2:
        return 1.0
    separable = bool(np.all(probs.argmax(1) == y))
    target = np.zeros((n, k))
    target[np.arange(n), y] = 1.0
    if separable:
        eps = 1.0 / (n + 2)
        target = target * (1.0 - eps) + (1.0 - target) * eps / (k - 1)

    def f(log_t):
        return float(-(target * np.log(np.clip(calibrate(probs, math.exp(log_t)), EPS, 1.0))).sum(1).mean())

    a, b = math.log(low), math.log(high)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(60):  # the bracket shrinks by 0.618 each step: 60 steps reach ~1e-12 of log T
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    t = math.exp((a + b) / 2)
    if separable:
        t = min(t, 1.0)
    return t if f(math.log(t)) < f(0.0) else 1.0  # never worse than leaving the model alone


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> dict:
    """The reliability diagram's data (per equal-width confidence bin: count, mean confidence, accuracy) and the
    expected calibration error: the count-weighted mean |accuracy - confidence| over the bins."""
    y = np.asarray(y, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(1) if len(y) else np.zeros(0)
    correct = (probs.argmax(1) == y) if len(y) else np.zeros(0, dtype=bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        m = which == b
        n = int(m.sum())
        row = {"low": float(edges[b]), "high": float(edges[b + 1]), "n": n,
               "confidence": float(conf[m].mean()) if n else None, "accuracy": float(correct[m].mean()) if n else None}
        if n:
            ece += n / len(y) * abs(row["accuracy"] - row["confidence"])
        rows.append(row)
    return {"bins": rows, "ece": float(ece) if len(y) else float("nan")}


def ece(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    return reliability(probs, y, bins)["ece"]
