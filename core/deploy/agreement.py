"""Does an exported file decide as the studio does? And its int8 twin.

The studio's own path runs in the run's precision (bf16 on a CPU where it measured faster), the exported file in
fp32 (or int8): their probabilities differ a little, and an image near the rule's threshold can be decided one way
in the studio and the other on the line. An ONNX export therefore counts, on the validation and test parts and the
golden set, how many decisions (argmax, and the saved rule's pass / fail / review) the file and the studio agree on,
and the largest probability difference. Where any rule decision differs, the card's rule is chosen again from the
user's same costs on the *file's* validation probabilities: the line runs the file, so its threshold must be the
file's (evaluating the studio in fp32 would instead change every figure the user has seen). The card says which.

int8: onnxruntime's static quantization (QDQ, per-channel int8 weights, uint8 activations) calibrated on images of
the training part; the card carries fp32 and int8 test and golden accuracy and their agreement.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from core.decide.rule import DecisionError, Rule, fit_rule
from core.decide.stored import load_rule
from core.infer.classifier import Classifier
from core.infer.evaluate import golden_images
from core.models.device import select_device
from core.runs.rundata import load_run_data
from core.workspace.store import Run, Workspace

CALIBRATION_IMAGES = 256  # training images int8 calibration reads (spread over the classes by the split's order)
MAX_INT8_DROP = 0.01      # int8 may lose at most a point of test or golden accuracy, unless forced


def parts_for_checking(ws: Workspace, run: Run, hw: tuple[int, int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(uint8 images, labels) of the run's validation and test parts and its dataset's golden set."""
    data = load_run_data(ws, run, hw, torch.device("cpu"), parts=("val", "test"))
    out = {}
    for part in ("val", "test"):
        idx = data.parts.get(part, np.zeros(0, dtype=np.int64))
        out[part] = (np.asarray(data.images[data.rows[idx]]), data.labels[idx])
    g = golden_images(ws, run, hw)
    out["golden"] = (np.asarray(g["images"]), g["y"])
    return out


def onnx_probs(path: str | Path, images: np.ndarray, batch: int = 64) -> np.ndarray:
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = [session.run(None, {"images": np.ascontiguousarray(images[s:s + batch])})[0]
           for s in range(0, len(images), batch)]
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, 0))


def studio_probs(ws: Workspace, run: Run, parts: dict) -> dict[str, np.ndarray]:
    """The studio's own probabilities (the run's precision and TTA, its temperature) for each part."""
    clf = Classifier.from_checkpoint(run.best_path, select_device(run.config().device), run.temperature())
    return {name: clf.probs_of_batches(torch.from_numpy(np.ascontiguousarray(x[s:s + 64]))
                                       for s in range(0, len(x), 64)) for name, (x, _) in parts.items()}


def agreement(a: np.ndarray, b: np.ndarray, rule: Rule | None, rule_b: Rule | None = None) -> dict:
    """How two sets of probabilities for the same images decide alike: argmax, and the rule's verdicts (`rule` on
    `a`, `rule_b` (default `rule`) on `b`), and the largest probability difference."""
    n = len(a)
    out = {"n": int(n), "argmax_agree": int((a.argmax(1) == b.argmax(1)).sum()) if n else 0,
           "max_prob_diff": float(np.abs(a - b).max()) if n else 0.0}
    if rule is not None and n:
        out["verdict_agree"] = int(sum(x == y for x, y in zip(rule.verdicts(a), (rule_b or rule).verdicts(b))))
    return out


def accuracy(probs: np.ndarray, y: np.ndarray) -> float | None:
    return float((probs.argmax(1) == y).mean()) if len(y) else None


def check_file(ws: Workspace, run: Run, path: str | Path, parts: dict, studio: dict) -> dict:
    """The card's "agreement" section for an exported file, and the rule the card should carry."""
    rule = load_rule(run)
    file_probs = {name: onnx_probs(path, x) for name, (x, _) in parts.items()}
    figures = {name: agreement(studio[name], file_probs[name], rule) for name in parts}
    differs = rule is not None and any(f.get("verdict_agree", f["n"]) < f["n"] for f in figures.values())
    chosen, why = rule, ("the studio's rule: the file and the studio decide every checked image alike"
                         if rule is not None else "no decision rule saved")
    if differs and not rule.inputs:
        why = ("the studio's rule, though the file decides some images differently: it was saved before the studio "
               "kept a rule's inputs, so it cannot be chosen again (decide the run again to have it chosen)")
    elif differs:
        val_x, val_y = parts["val"]
        try:
            chosen = fit_rule(file_probs["val"], val_y, run.split()["classes"], **rule.inputs)
            why = ("chosen again on this file's validation probabilities (the same costs and band target): the file "
                   "and the studio decided some images differently, and the line runs the file")
            for name in parts:
                figures[name]["verdict_agree_after"] = agreement(studio[name], file_probs[name], rule, chosen)[
                    "verdict_agree"] if len(parts[name][1]) else 0
        except (DecisionError, TypeError, KeyError):
            why = "the studio's rule (it could not be chosen again on the file's probabilities)"
    return {"agreement": {**figures, "rule": why}, "rule": chosen.to_dict() if chosen else None,
            "accuracy": {name: accuracy(file_probs[name], y) for name, (_, y) in parts.items()},
            "probs": file_probs}


class _Calibration:
    """onnxruntime's CalibrationDataReader over training images, a batch at a time."""

    def __init__(self, images: np.ndarray, batch: int = 16):
        self.batches = iter([{"images": np.ascontiguousarray(images[s:s + batch])}
                             for s in range(0, len(images), batch)])

    def get_next(self):
        return next(self.batches, None)


def calibration_images(ws: Workspace, run: Run, hw: tuple[int, int], n: int = CALIBRATION_IMAGES) -> np.ndarray:
    data = load_run_data(ws, run, hw, torch.device("cpu"), parts=("train",))
    idx = data.parts["train"]
    pick = idx[np.linspace(0, len(idx) - 1, min(n, len(idx))).astype(np.int64)] if len(idx) else idx
    return np.asarray(data.images[data.rows[pick]])


def quantize(fp32_path: str | Path, out_path: str | Path, images: np.ndarray) -> None:
    """Static int8 quantization of an exported fp32 ONNX file, calibrated on `images` (uint8, N x H x W x 3)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    reader = type("Reader", (_Calibration, CalibrationDataReader), {})(images)
    work = Path(tempfile.mkdtemp(prefix="int8-"))
    try:
        pre = work / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre))  # shapes and folded constants: what the quantizer expects
        quantize_static(str(pre), str(out_path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def file_size_mb(path: str | Path) -> float:
    return round(os.path.getsize(path) / 1e6, 2)
