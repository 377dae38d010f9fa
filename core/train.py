"""Training: prepare a run (dataset, split), then fit it epoch by epoch, then evaluate on the test split.

Reads straight down like torchvision's references: `train_one_epoch` and `evaluate_loss_acc` return
metrics as data; `fit` logs them, keeps the best and last checkpoints, and reports to a Reporter
(the CLI's progress bar, or the job manager's snapshot). Nothing here knows about Streamlit.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig
from .data import IMAGE_CACHE, Stopped, load_dataset, samples_from_split, split_to_json, stratified_split
from .model import build_model
from .storage import Run, Workspace
from .transforms import (IMAGENET_MEAN, IMAGENET_STD, AugmentSpec, Normalizer, build_train_augment,
                         normalize_unit)


class TrainingError(Exception):
    """Training cannot go on; the message is for the user."""


def failure_message(exc: BaseException) -> str:
    """What a failed run records: a TrainingError's own words, anything else named by its type."""
    return str(exc) if isinstance(exc, TrainingError) else f"{type(exc).__name__}: {exc}"


class Reporter:
    """What training tells the outside world. The default does nothing; subclasses override."""

    def log(self, message: str) -> None: ...
    def stage(self, name: str, done: int = 0, total: int = 0) -> None: ...
    def batch(self, epoch: int, batch: int, batches: int, images_per_s: float) -> None: ...
    def epoch_end(self, row: dict) -> None: ...
    def should_stop(self) -> bool: return False


# ----------------------------------------------------------------------------------------------------
# Device and precision


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


def describe_device(device: torch.device | None = None) -> str:
    device = device or select_device()
    if device.type == "cuda":
        return f"CUDA: {torch.cuda.get_device_name(device)}"
    if device.type == "mps":
        return "Apple MPS"
    return f"CPU ({os.cpu_count()} cores, {'bf16' if cpu_supports_bf16() else 'fp32'})"


# ----------------------------------------------------------------------------------------------------
# Preparing a run


def prepare_run(ws: Workspace, cfg: TrainConfig, run_id: str | None = None,
                label_version: int | None = None) -> Run:
    """Validate, load the dataset, split it, and create the run folder. Raises ConfigError or
    DatasetError before anything starts, so a bad config never becomes a failed run."""
    cfg.validate()
    w = str(cfg.weights).strip()
    if w.lower() not in ("imagenet", "none", "scratch") and not Path(w).expanduser().is_file():
        raise ConfigError("weights", f"file {w} not found (use imagenet, none, or a .pth file)")
    from .labels import LabelStore
    store = LabelStore(ws)
    ds = store.apply(load_dataset(cfg.data))  # the effective labels: folder labels overridden by the store
    if label_version is None:
        label_version = store.version(ds.source)
    split = stratified_split(ds, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    if not split["val"]:
        raise ConfigError("val_fraction", "the validation split is empty: raise val_fraction or add a val/ folder")
    if cfg.batch_size > len(split["train"]):
        raise ConfigError("batch_size", f"{cfg.batch_size} is larger than the training split "
                                        f"({len(split['train'])} images): lower it")
    run = ws.create_run(cfg, ds.name, run_id)
    run.split_path.write_text(json.dumps(split_to_json(ds, split)))
    (run.dir / "skipped.json").write_text(json.dumps(ds.skipped))
    if label_version is not None:
        ws.update_run(run.id, label_version=label_version)
    counts = {p: len(v) for p, v in split.items()}
    run.log(f"dataset {ds.name}: {len(ds.samples)} images, {len(ds.classes)} classes, split {counts}, "
            f"{len(ds.skipped)} files skipped")
    return run


# ----------------------------------------------------------------------------------------------------
# Data held for a run: decoded images (in memory, memory-mapped, or on the GPU) and split indices


@dataclass
class RunData:
    classes: list[str]
    images: object            # MxHxWx3 uint8: numpy array/memmap, or a torch tensor (maybe on GPU)
    parts: dict[str, np.ndarray]  # sample indices per split part
    labels: np.ndarray        # per sample
    paths: list[str]          # per sample
    rows: np.ndarray          # per sample: its row in `images`
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def batch(self, idx: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows[idx]
        if isinstance(self.images, torch.Tensor):
            x = self.images.index_select(0, torch.as_tensor(rows, device=self.images.device))
        else:
            x = torch.from_numpy(np.ascontiguousarray(self.images[rows]))
        y = torch.from_numpy(self.labels[idx]).long()
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def load_run_data(ws: Workspace, run: Run, cfg: TrainConfig, device: torch.device,
                  reporter: Reporter | None = None, parts=("train", "val", "test")) -> RunData:
    split = run.split()
    classes = split["classes"]
    samples, part_of = [], []
    for part in parts:
        for s in samples_from_split(split, part):
            samples.append(s)
            part_of.append(part)
    paths = [s.path for s in samples]

    def progress(done, total):
        if reporter:
            reporter.stage("decoding images", done, total)

    # The cache is asked for the images in one canonical order (sorted paths), so runs over the same images
    # in another split order (the folds of a cross-validation, a re-split) decode them once, not once each.
    unique = sorted(set(paths))
    row_of = {p: i for i, p in enumerate(unique)}
    rows = np.array([row_of[p] for p in paths], dtype=np.int64)
    decoded = IMAGE_CACHE.get(unique, cfg.input_hw, ws.cache_dir, progress,
                              reporter.should_stop if reporter else None)
    skipped = [(unique[r], reason) for r, reason in sorted(decoded.failed.items())]
    part_arr = np.array(part_of)
    ok = ~np.isin(rows, list(decoded.failed))
    idx = {p: np.nonzero((part_arr == p) & ok)[0] for p in parts}
    images = decoded.array
    if device.type == "cuda" and not decoded.on_disk:
        free, _ = torch.cuda.mem_get_info(device)
        if images.nbytes < 0.5 * free:  # keep the whole set resident on the GPU: no host copies per batch
            images = torch.from_numpy(images).to(device)
    return RunData(classes, images, idx, np.array([s.label for s in samples], dtype=np.int64), paths, rows,
                   skipped)


# ----------------------------------------------------------------------------------------------------
# One epoch of training; one pass of evaluation


@dataclass
class StepState:
    micro_batches: int = 1   # >1 after a CUDA out-of-memory: the batch is split, gradients accumulated
    oom_retries: int = 0


MAX_OOM_HALVINGS = 4


def train_one_epoch(model, criterion, optimizer, scheduler_per_batch, scaler, data: RunData, cfg: TrainConfig,
                    device, amp, normalizer: Normalizer, augment, gen: torch.Generator, epoch: int,
                    reporter: Reporter, step: StepState) -> dict:
    model.train()
    if cfg.freeze_backbone:  # feature extraction: the frozen backbone keeps its BatchNorm statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
    order = data.parts["train"][torch.randperm(len(data.parts["train"]), generator=gen).numpy()]
    bs = cfg.batch_size
    batches = [order[i:i + bs] for i in range(0, len(order), bs)]
    if len(batches) > 1 and len(batches[-1]) == 1:  # BatchNorm cannot train on a batch of one
        batches = batches[:-1]
    total_loss, correct, seen = 0.0, 0, 0
    t0 = time.perf_counter()
    for b, idx in enumerate(batches):
        if reporter.should_stop():
            raise Stopped()
        x_u8, y = data.batch(idx, device)
        x = x_u8.permute(0, 3, 1, 2).float().div_(255.0)
        x = augment(x, gen)
        x = normalize_unit(x, normalizer)
        while True:
            try:
                loss_sum, n_correct = _step(model, criterion, optimizer, scaler, x, y, amp, step.micro_batches)
                break
            except torch.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                step.oom_retries += 1
                if step.oom_retries > MAX_OOM_HALVINGS or step.micro_batches * 2 > len(idx):
                    raise TrainingError(
                        f"out of GPU memory even with the batch split {step.micro_batches} ways; "
                        "lower batch_size or image_size") from None
                step.micro_batches *= 2
                reporter.log(f"out of memory: batch now processed in {step.micro_batches} parts "
                             "(same effective batch size)")
        if not math.isfinite(loss_sum):
            raise TrainingError(f"training diverged: the loss became {loss_sum} at epoch {epoch}, batch {b + 1}. "
                                "No checkpoint was written for it; lower the learning rate and try again.")
        if scheduler_per_batch is not None:
            scheduler_per_batch.step()
        total_loss += loss_sum
        correct += n_correct
        seen += len(idx)
        reporter.batch(epoch, b + 1, len(batches), seen / max(time.perf_counter() - t0, 1e-9))
    seconds = time.perf_counter() - t0
    return {"train_loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1),
            "train_seconds": seconds, "images_per_s": seen / max(seconds, 1e-9)}


def _step(model, criterion, optimizer, scaler, x, y, amp, parts: int) -> tuple[float, int]:
    optimizer.zero_grad(set_to_none=True)
    loss_total, correct = 0.0, 0
    n = len(y)
    for xs, ys in zip(x.chunk(parts), y.chunk(parts)):
        with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(xs)
            loss = criterion(logits.float(), ys)
        scaler.scale(loss * (len(ys) / n)).backward()
        loss_total += loss.item() * len(ys)
        correct += (logits.argmax(1) == ys).sum().item()
    scaler.step(optimizer)
    scaler.update()
    return loss_total, correct


@torch.no_grad()
def predict_probs(model, data: RunData, part_idx: np.ndarray, device, amp, normalizer: Normalizer,
                  batch_size: int = 64, tta: bool = False, should_stop=None) -> np.ndarray:
    """Softmax probabilities for the given images (rows follow part_idx)."""
    model.eval()
    out = []
    for i in range(0, len(part_idx), batch_size):
        if should_stop and should_stop():
            raise Stopped()
        x_u8, _ = data.batch(part_idx[i:i + batch_size], device)
        x = normalize_unit(x_u8.permute(0, 3, 1, 2).float().div_(255.0), normalizer)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(x).float()
            if tta:  # average over flips (the views a flip-augmented model has learned)
                probs = logits.softmax(1) + model(x.flip(3)).float().softmax(1)
                probs = probs + model(x.flip(2)).float().softmax(1)
                out.append((probs / 3).cpu())
                continue
        out.append(logits.softmax(1).cpu())
    if not out:
        return np.zeros((0, len(data.classes)), dtype=np.float32)
    return torch.cat(out).numpy().astype(np.float64)


def evaluate_loss_acc(model, data: RunData, part: str, device, amp, normalizer, cfg, reporter=None) -> dict:
    idx = data.parts[part]
    probs = predict_probs(model, data, idx, device, amp, normalizer, max(cfg.batch_size, 64),
                          should_stop=reporter.should_stop if reporter else None)
    y = data.labels[idx]
    p_true = np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)
    return {f"{part}_loss": float(-np.log(p_true).mean()) if len(y) else float("nan"),
            f"{part}_acc": float((probs.argmax(1) == y).mean()) if len(y) else float("nan")}


# ----------------------------------------------------------------------------------------------------
# Fit


def _build_optimizer(cfg: TrainConfig, model):
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _build_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    """(scheduler, steps per batch?)"""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs), False
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.step_gamma), False
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * max(steps_per_epoch, 1)), True
    return None, False


def _class_weights(data: RunData) -> torch.Tensor:
    counts = np.bincount(data.labels[data.parts["train"]], minlength=len(data.classes)).astype(np.float64)
    weights = counts.sum() / (len(counts) * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32)


def fit(ws: Workspace, run: Run, reporter: Reporter | None = None, resume: bool = False,
        epochs: int | None = None) -> dict:
    """Train a prepared run to the end (or until stopped / early-stopped), then evaluate it.

    Returns {"status": "done"|"stopped", ...}. Raises TrainingError (and other exceptions) on failure;
    the caller records the failure.
    """
    reporter = reporter or Reporter()
    cfg = run.config()
    if epochs:
        cfg.epochs = epochs
        run.config_path.write_text(json.dumps(cfg.to_dict(), indent=2))
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    device = select_device(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(cfg.num_threads or os.cpu_count() or 1)
    amp = autocast_dtype(device, cfg.amp)
    reporter.log(f"device {describe_device(device)}; precision {amp or 'fp32'}; channels_last {cfg.channels_last}")

    data = load_run_data(ws, run, cfg, device, reporter)
    if data.skipped:
        reporter.log(f"{len(data.skipped)} images could not be decoded and are left out")
        prev = json.loads((run.dir / "skipped.json").read_text()) if (run.dir / "skipped.json").exists() else []
        (run.dir / "skipped.json").write_text(json.dumps(prev + [list(s) for s in data.skipped]))
    if len(data.parts["train"]) < 2 or len(data.parts["val"]) < 1:
        raise TrainingError("too few readable images left for training and validation")

    if cfg.normalization == "dataset":
        from .data import channel_stats
        arr = data.images.cpu().numpy() if isinstance(data.images, torch.Tensor) else data.images
        mean, std = channel_stats(arr, data.rows[data.parts["train"]])
    else:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    normalizer = Normalizer(list(mean), list(std))

    reporter.stage("building model")
    model = build_model(cfg.arch, len(data.classes), cfg.weights, cfg.dropout, cfg.freeze_backbone)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    criterion = nn.CrossEntropyLoss(weight=_class_weights(data).to(device) if cfg.class_weights else None,
                                    label_smoothing=cfg.label_smoothing)
    optimizer = _build_optimizer(cfg, model)
    steps = max(1, math.ceil(len(data.parts["train"]) / cfg.batch_size))
    scheduler, per_batch = _build_scheduler(cfg, optimizer, steps)
    scaler = torch.amp.GradScaler(device.type, enabled=(amp == torch.float16))
    gen = torch.Generator().manual_seed(cfg.seed)
    augment = build_train_augment(AugmentSpec.from_config(cfg))

    history: list[dict] = []
    best = {"val_acc": -1.0, "val_loss": float("inf"), "epoch": 0}
    stale = 0
    start_epoch = 1
    if resume:
        if not run.last_path.exists():
            raise TrainingError("this run has no completed epoch to resume from; start a new run instead")
        state, meta, payload = load_checkpoint(run.last_path)
        model.load_state_dict(state)
        optimizer.load_state_dict(payload["optimizer"])
        if scheduler is not None and "scheduler" in payload:
            scheduler.load_state_dict(payload["scheduler"])
        if "scaler" in payload:
            scaler.load_state_dict(payload["scaler"])
        if "generator" in payload:
            gen.set_state(payload["generator"])
        history = run.history()[: meta["epoch"]]
        best = meta.get("best", best)
        stale = meta.get("stale_epochs", 0)
        start_epoch = meta["epoch"] + 1
        normalizer = Normalizer(meta["normalization"]["mean"], meta["normalization"]["std"])
        reporter.log(f"resuming at epoch {start_epoch} of {cfg.epochs}")

    def meta_for(epoch: int, row: dict) -> dict:
        return {"run_id": run.id, "classes": data.classes, "config": cfg.to_dict(),
                "normalization": {"mean": normalizer.mean, "std": normalizer.std},
                "input_hw": list(cfg.input_hw), "epoch": epoch, "metrics": row, "best": best,
                "stale_epochs": stale, "device": device.type, "torch": torch.__version__}

    step_state = StepState()
    status = "done"
    better_is_higher = cfg.early_stop_metric == "val_acc"
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            reporter.stage("training")
            t0 = time.perf_counter()
            train_m = train_one_epoch(model, criterion, optimizer, scheduler if per_batch else None, scaler, data,
                                      cfg, device, amp, normalizer, augment, gen, epoch, reporter, step_state)
            reporter.stage("validating")
            val_m = evaluate_loss_acc(model, data, "val", device, amp, normalizer, cfg, reporter)
            lr = optimizer.param_groups[0]["lr"]
            if scheduler is not None and not per_batch:
                scheduler.step()
            row = {"epoch": epoch, "train_loss": train_m["train_loss"], "train_acc": train_m["train_acc"],
                   "val_loss": val_m["val_loss"], "val_acc": val_m["val_acc"], "lr": lr,
                   "seconds": time.perf_counter() - t0, "images_per_s": train_m["images_per_s"]}
            history.append(row)
            improved = (row["val_acc"] > best["val_acc"]
                        or (row["val_acc"] == best["val_acc"] and row["val_loss"] < best["val_loss"]))
            if improved:
                best = {"val_acc": row["val_acc"], "val_loss": row["val_loss"], "epoch": epoch}
            monitored_better = (row["val_acc"] > best.get("monitor", -1) if better_is_higher
                                else -row["val_loss"] > best.get("monitor", -float("inf")))
            if monitored_better:
                best["monitor"] = row["val_acc"] if better_is_higher else -row["val_loss"]
                stale = 0
            else:
                stale += 1
            # metrics.csv first: a process killed between the two writes then resumes from the older
            # checkpoint and trims the history to it, never the other way round.
            run.write_history(history)
            model_state = model.state_dict()
            if improved:
                save_checkpoint(run.best_path, model_state, meta_for(epoch, row))
            save_checkpoint(run.last_path, model_state, meta_for(epoch, row),
                            optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict() if scheduler is not None else None,
                            scaler=scaler.state_dict() if scaler.is_enabled() else None,
                            generator=gen.get_state())
            ws.update_run(run.id, epochs_done=epoch, best_val_acc=best["val_acc"])
            reporter.epoch_end(row)
            reporter.log(f"epoch {epoch}/{cfg.epochs}: train loss {row['train_loss']:.4f} acc "
                         f"{row['train_acc']:.3f} | val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f} | "
                         f"{row['seconds']:.1f}s, {row['images_per_s']:.0f} img/s" + (" *best*" if improved else ""))
            if cfg.early_stop_patience and stale >= cfg.early_stop_patience and epoch < cfg.epochs:
                reporter.log(f"early stopping: no improvement of {cfg.early_stop_metric} for {stale} epochs")
                break
    except Stopped:
        status = "stopped"
        reporter.log("stopped by request; the best checkpoint is kept")
    except CheckpointError as exc:
        raise TrainingError(f"{exc}. The previous checkpoint is unchanged.") from None

    result = {"status": status, "epochs_done": len(history), "best_val_acc": best["val_acc"],
              "history": history}
    if run.best_path.exists():
        from .evaluate import evaluate_run
        reporter.stage("evaluating")
        evaluation = evaluate_run(ws, run, data=data, device=device)
        result["test_acc"] = evaluation["accuracy"]
        reporter.log(f"test accuracy {evaluation['accuracy']:.4f}, macro F1 {evaluation['macro_f1']:.4f} "
                     f"on {evaluation['n']} images ({evaluation['split']} split)")
    return result
