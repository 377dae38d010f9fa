"""Taking a model out of the studio: an ONNX or TorchScript file that gives the studio's probabilities, and a
model card that travels with it.

The exported graph takes what the studio's inference path takes, uint8 RGB images N x H x W x 3 already resized to
the card's input size, and returns softmax probabilities N x classes in the card's class order: normalization and,
when asked (the run's own setting by default), the flip test-time augmentation are inside the graph, in fp32.
The ONNX file carries the card as metadata_props (key "model_card"), the TorchScript file as an extra file
("model_card.json"), and a <file>.card.json sits beside either, so the file alone is enough.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from core.config import TrainConfig
from core.data.split import samples_from_split
from core.decide.rule import Rule
from core.decide.stored import load_rule
from core.deploy.portable import CARD_KEY
from core.errors import UserError
from core.infer.classifier import run_tta, tta_views
from core.models.resnet import model_from_checkpoint
from core.workspace.files import write_atomic
from core.workspace.store import Run, Workspace

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}  # core/cli/deploy.py EXPORT_FORMATS names the same, without importing torch
ONNX_OPSET = 18


class ExportError(UserError):
    """The model cannot be exported as asked; the message says why. Nothing was written."""


class PortableClassifier(nn.Module):
    """uint8 N x H x W x 3 RGB -> probabilities, with the run's normalization, optional flip TTA and calibration
    temperature: the fp32 twin of core/infer/classifier.py's Classifier.probs, as one graph."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float], tta: bool, temperature: float = 1.0,
                 views: str = "flips"):
        super().__init__()
        self.model = model.eval()
        self.tta, self.views = tta, views
        self.temperature = float(temperature)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std
        if self.tta:
            # The views stacked into one batch, one pass: the graph holds the network once, not once per view (an
            # 8-view ONNX export traced 8 copies, and took 8 times as long to write)
            each = tta_views(x, self.views)
            probs = self.model(torch.cat(each, 0)).softmax(1).reshape(len(each), x.shape[0], -1).mean(0)
        else:
            probs = self.model(x).softmax(1)
        if self.temperature != 1.0:  # decide.calibrate: softmax(log p / T)
            probs = (probs.clamp_min(1e-12).log() / self.temperature).softmax(1)
        return probs


def dataset_hash(run: Run) -> str:
    """SHA-256 over the run's split: every image's part, label and bytes, in the split's order."""
    h = hashlib.sha256()
    split = run.split()
    for part in ("train", "val", "test"):
        for s in samples_from_split(split, part):
            h.update(f"{part}|{split['classes'][s.label]}|".encode("utf-8", "surrogateescape"))
            try:
                with open(s.path, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
            except OSError:
                h.update(b"<missing>")
    return h.hexdigest()


TTA_TEXT = {"flips": "mean of the image and its horizontal and vertical flips",
            "dihedral": "mean of the image's 8 flips and quarter turns"}


def model_card(run: Run, meta: dict, fmt: str, tta: bool, views: str = "flips") -> dict:
    cfg = TrainConfig.from_dict(meta["config"])
    ev = run.evaluation() or {}
    return {
        "format": fmt, "run_id": run.id, "exported": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch.__version__,
        "classes": meta["classes"], "checkpoint_epoch": meta["epoch"],
        "input": {"name": "images", "dtype": "uint8", "layout": "NHWC", "channels": "RGB",
                  "height": meta["input_hw"][0], "width": meta["input_hw"][1]},
        "resize": "EXIF orientation applied, converted to RGB (transparency on white, 16-bit scaled), then "
                  "resized to height x width with bilinear filtering (PIL, reducing_gap=3.0), aspect not kept",
        "normalization": meta["normalization"], "tta": TTA_TEXT[views] if tta else "none",
        "output": {"name": "probabilities", "dtype": "float32", "shape": "N x classes, softmax, in class order"},
        "temperature": run.temperature(),  # already applied inside the graph
        "rule": rule.to_dict() if (rule := load_rule(run)) else None,  # core.decide.Rule: pass / fail / review
        "config": cfg.to_dict(),
        "test_metrics": {k: ev.get(k) for k in ("split", "n", "accuracy", "macro_f1", "loss")} if ev else None,
        "dataset_sha256": dataset_hash(run),
    }


def export_run(ws: Workspace, run_id: str, fmt: str = "onnx", out: str | Path | None = None,
               tta: bool | None = None, int8: bool = False, force: bool = False) -> dict:
    """Write the run's best checkpoint as `fmt` to `out` (default: the run's exports/ folder) with its card beside.
    An ONNX file is checked against the studio's own path (core/deploy/agreement.py: the card's "agreement"); with
    `int8` it is quantized, and refused when it loses more than a point of test or golden accuracy unless `force`.
    Returns {"path", "card_path", "card"}. ExportError (nothing left behind) for a run without a checkpoint, an
    unknown format, an int8 file that lost too much, or an unwritable destination."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}: choose {' or '.join(FORMATS)}")
    if int8 and fmt != "onnx":
        raise ExportError("int8 quantization is for ONNX files: --format onnx --int8")
    run = ws.run(run_id)
    if not run.best_path.exists():
        raise ExportError(f"run {run_id} has no best checkpoint yet (no epoch finished): nothing to export")
    model, meta = model_from_checkpoint(run.best_path)
    run_uses_tta, views = run_tta(meta)
    tta = run_uses_tta if tta is None else tta
    out = Path(out).expanduser() if out else run.dir / "exports" / f"{run_id}{'.int8' if int8 else ''}{FORMATS[fmt]}"
    card = model_card(run, meta, fmt, tta, views)
    portable = PortableClassifier(model.float(), meta["normalization"]["mean"], meta["normalization"]["std"], tta,
                                  run.temperature(), views)
    example = torch.zeros(2, *meta["input_hw"], 3, dtype=torch.uint8)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        card_path = out.with_name(out.name + ".card.json")
        if fmt == "onnx":
            write_atomic(out, lambda tmp: _write_checked_onnx(ws, run, portable, example, tmp, card, int8, force))
        else:
            write_atomic(out, lambda tmp: _write_torchscript(portable, example, tmp, card))
        write_atomic(card_path, lambda tmp: Path(tmp).write_text(json.dumps(card, indent=2)))
    except OSError as exc:
        raise ExportError(f"cannot write {out}: {exc.strerror or exc}") from None
    return {"path": str(out), "card_path": str(card_path), "card": card}


def _write_checked_onnx(ws: Workspace, run: Run, portable: nn.Module, example: torch.Tensor, path: str, card: dict,
                        int8: bool, force: bool) -> None:
    """The ONNX file, checked against the studio on the validation and test parts and the golden set: the card gets
    the agreement figures and the rule chosen for the file; int8 also the fp32 / int8 accuracies (or a refusal)."""
    from core.deploy import agreement as ag
    hw = (card["input"]["height"], card["input"]["width"])
    parts = ag.parts_for_checking(ws, run, hw)
    studio = ag.studio_probs(ws, run, parts)
    target = path + ".fp32.onnx" if int8 else path
    try:
        _write_onnx(portable, example, target)
        checked = ag.check_file(ws, run, target, parts, studio)
        if int8:
            ag.quantize(target, path, ag.calibration_images(ws, run, hw))
            fp32, checked = checked, ag.check_file(ws, run, path, parts, studio)
            card["int8"] = _int8_figures(fp32, checked, parts, target, path, force)
    finally:
        if int8 and os.path.exists(target):
            os.unlink(target)
    card.update(precision="int8" if int8 else "fp32", agreement=checked["agreement"], rule=checked["rule"])
    _embed_card(path, card)


def _int8_figures(fp32: dict, int8: dict, parts: dict, fp32_path: str, int8_path: str, force: bool) -> dict:
    from core.deploy import agreement as ag
    figures = {"fp32": {"accuracy": fp32["accuracy"], "size_mb": ag.file_size_mb(fp32_path)},
               "int8": {"accuracy": int8["accuracy"], "size_mb": ag.file_size_mb(int8_path)},
               "agreement_with_fp32": {name: ag.agreement(fp32["probs"][name], int8["probs"][name],
                                                          Rule.from_dict(fp32["rule"]) if fp32["rule"] else None)
                                       for name in parts},
               "max_accuracy_drop": ag.MAX_INT8_DROP}
    lost = [f"{name} accuracy {fp32['accuracy'][name]:.4f} -> {int8['accuracy'][name]:.4f}"
            for name in ("test", "golden") if fp32["accuracy"][name] is not None
            and fp32["accuracy"][name] - int8["accuracy"][name] > ag.MAX_INT8_DROP + 1e-12]
    if lost and not force:
        raise ExportError(f"int8 loses more than {ag.MAX_INT8_DROP * 100:g} point of accuracy ({'; '.join(lost)}): "
                          "nothing written; export fp32, or --force to write the int8 file anyway")
    figures["forced"] = bool(lost)
    return figures


def _write_onnx(portable: nn.Module, example: torch.Tensor, path: str) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's progress chatter
        torch.onnx.export(portable, (example,), path, input_names=["images"], output_names=["probabilities"],
                          dynamic_shapes={"images": {0: batch}}, dynamo=True, opset_version=ONNX_OPSET,
                          external_data=False, verbose=False)


def _embed_card(path: str, card: dict) -> None:
    import onnx
    proto = onnx.load(path)
    for old in [e for e in proto.metadata_props if e.key == CARD_KEY]:
        proto.metadata_props.remove(old)
    entry = proto.metadata_props.add()
    entry.key, entry.value = CARD_KEY, json.dumps(card)
    onnx.save(proto, path)


def _write_torchscript(portable: nn.Module, example: torch.Tensor, path: str, card: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # PyTorch now steers to torch.export; ONNX is the portable file
        scripted = torch.jit.script(portable)
        torch.jit.save(scripted, path, _extra_files={"model_card.json": json.dumps(card)})


def read_onnx_card(path: str | Path) -> dict:
    """The model card an exported ONNX file carries."""
    import onnx
    proto = onnx.load(str(path), load_external_data=False)
    for entry in proto.metadata_props:
        if entry.key == CARD_KEY:
            return json.loads(entry.value)
    raise ExportError(f"{path} has no studio model card in its metadata")
