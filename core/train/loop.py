"""Training: fit a prepared run epoch by epoch, keep its best and last checkpoints, then evaluate it.

Reads straight down like torchvision's references: `train_one_epoch` and `validate` return metrics as data;
`fit` records them, writes checkpoints and reports to a Reporter (the CLI's progress bar, or the job manager's
snapshot). The learning rate is core/train/schedule.py's pure function of the step, set before every step. Nothing
here knows about Streamlit, and nothing here writes a run's status (core/runs/life.py owns it).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from core.config import TrainConfig
from core.data.cache import Stopped, channel_stats
from core.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentSpec,
    MixSpec,
    Normalizer,
    build_mix,
    build_train_augment,
    to_unit,
)
from core.infer.classifier import forward_probs
from core.infer.evaluate import evaluate_run
from core.models.checkpoint import CheckpointError, load_checkpoint, refuse_nonfinite, save_checkpoint
from core.models.device import autocast, autocast_dtype, cpu_threads, describe_device, select_device, set_cpu_threads
from core.models.resnet import build_model, model_from_checkpoint
from core.runs.life import Reporter, TrainingError, record
from core.runs.rundata import RunData, load_run_data
from core.train import distributed
from core.train.averaging import WeightAverage, averages_in, build_average
from core.train.distributed import SINGLE, Ranks
from core.train.graphs import EagerForward, GraphedForward, build_forward
from core.train.losses import build_criterion
from core.train.pretrain import SELF_SUPERVISED, pretrained_weights
from core.train.schedule import apply_lr, epoch_batches, lr_at, train_hw_at
from core.workspace.store import Run, Workspace

MAX_OOM_HALVINGS = 4


@dataclass
class Trainer:
    """Everything one fit trains with, built once from the run's config."""
    cfg: TrainConfig
    device: torch.device
    amp: torch.dtype | None
    data: RunData
    normalizer: Normalizer
    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    gen: torch.Generator     # the shuffling order: the same on every rank
    augment: object
    steps_per_epoch: int
    train_model: nn.Module   # what the steps call: `model`, or DDP around it on several devices
    ranks: Ranks = SINGLE
    micro_batches: int = 1   # >1 after a CUDA out-of-memory: the batch is split, gradients accumulated
    oom_retries: int = 0
    average: WeightAverage | None = None  # the weights' average (cfg.ema or cfg.swa_epochs), validated beside them
    mix: object = None       # mixup / CutMix (transforms.build_mix), or None
    forward: EagerForward | None = None  # the step's forward: train_model under autocast, maybe as a CUDA graph


@dataclass
class Progress:
    """What the epochs so far left behind: their metrics, the best one, and early stopping's count."""
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"val_acc": -1.0, "val_loss": float("inf"), "epoch": 0})
    stale: int = 0

    @property
    def next_epoch(self) -> int:
        return len(self.history) + 1


def fit(ws: Workspace, run: Run, reporter: Reporter | None = None, resume: bool = False,
        ranks: Ranks = SINGLE) -> dict:
    """Train a prepared run to its config's last epoch (or until stopped / early-stopped), then evaluate it.
    On several devices (`ranks`, core/train/distributed.py) every rank calls this; rank 0 alone writes.

    Returns {"status": "done"|"stopped", ...}. Raises TrainingError (and other exceptions) on failure;
    the caller (core/runs/life.py's execute) records the failure."""
    reporter = reporter or Reporter()
    cfg = run.config()
    try:
        t = build_trainer(ws, run, cfg, reporter, ranks)
    except Stopped:  # while decoding the images
        reporter.log("stopped by request before the first epoch")
        return {"status": "stopped", "epochs_done": 0, "best_val_acc": None, "history": []}
    progress = restore(run, t, reporter) if resume else Progress()
    main = ranks.main
    status = "done"
    pacer = CheckpointPacer()
    try:
        for epoch in range(progress.next_epoch, cfg.epochs + 1):
            t0 = time.perf_counter()
            reporter.stage("training")
            train_m = train_one_epoch(t, epoch, reporter)
            reporter.stage("validating")
            row = {"epoch": epoch, **train_m, **validate(t, "val", reporter)}
            if t.average is not None and averages_in(cfg, epoch):
                avg = validate_average(t, reporter)
                row.update(avg_val_loss=avg["val_loss"], avg_val_acc=avg["val_acc"])
            row["seconds"] = time.perf_counter() - t0
            improved = update_progress(progress, row, cfg)  # every rank decides alike: same metrics everywhere
            early = bool(cfg.early_stop_patience and progress.stale >= cfg.early_stop_patience and epoch < cfg.epochs)
            if main:
                run.write_history(progress.history)  # before the checkpoints: see restore()
                pacer.epoch_end(run, t, progress, row, improved, final=early or epoch == cfg.epochs)
                record(ws, run.id, epochs_done=epoch, best_val_acc=progress.best["val_acc"])
                reporter.epoch_end(row)
                reporter.log(epoch_line(row, cfg.epochs, improved))
            if early:
                reporter.log(f"early stopping: no improvement of {cfg.early_stop_metric} for {progress.stale} epochs")
                break
    except Stopped:
        status = "stopped"
        reporter.log("stopped by request; the best checkpoint is kept")
    except CheckpointError as exc:
        raise TrainingError(f"{exc}. The previous checkpoint is unchanged.") from None
    finally:
        if main:  # best weights held back by the pacer reach best.pt whatever ended the loop
            pacer.flush(run, reporter)
    result = {"status": status, "epochs_done": len(progress.history), "best_val_acc": progress.best["val_acc"],
              "history": progress.history}
    if main and run.best_path.exists():
        if cfg.tta and cfg.tta_views == "auto":
            reporter.stage("choosing test-time augmentation")
            choose_tta_views(run, t, reporter)
        reporter.stage("evaluating")
        evaluation = evaluate_run(ws, run, data=t.data, device=t.device)
        result["test_acc"] = evaluation["accuracy"]
        reporter.log(f"test accuracy {evaluation['accuracy']:.4f}, macro F1 {evaluation['macro_f1']:.4f} "
                     f"on {evaluation['n']} images ({evaluation['split']} split)")
    return result


# ----------------------------------------------------------------------------------------------------
# Building and restoring


def build_trainer(ws: Workspace, run: Run, cfg: TrainConfig, reporter: Reporter, ranks: Ranks = SINGLE) -> Trainer:
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    np.random.seed(cfg.seed % 2**32)
    device = distributed.start(ranks, cfg.device) if ranks.distributed else select_device(cfg.device)
    # Ranks on one machine share its cores.
    set_cpu_threads(device, cfg.num_threads or max(1, cpu_threads() // ranks.local_world))
    amp = autocast_dtype(device, cfg.amp)
    reporter.log(f"device {describe_device(device)}; precision {amp or 'fp32'}; channels_last {cfg.channels_last}"
                 + (f"; {ranks.world} processes, {cfg.batch_size} images per step split across them, batch norm "
                    f"{cfg.batch_norm}" if ranks.distributed else ""))
    # Decoded once into the workspace's disk cache and memory-mapped: shared by the ranks of a machine and by the
    # next training process on the same images.
    self_supervised = str(cfg.weights).strip().lower() == SELF_SUPERVISED
    data = load_run_data(ws, run, cfg.input_hw, device, reporter, shared=True,
                         parts=("train", "val", "test") + (("unlabeled",) if self_supervised else ()))
    if data.skipped:
        reporter.log(f"{len(data.skipped)} images could not be decoded and are left out:")
        for path, reason in data.skipped:
            reporter.log(f"  {path}: {reason}")
        run.write_skipped(data.skipped)
    if len(data.parts["train"]) < 2 or len(data.parts["val"]) < 1:
        raise TrainingError("too few readable images left for training and validation")
    mean, std = channel_stats(*data.train_arrays()) if cfg.normalization == "dataset" else (IMAGENET_MEAN,
                                                                                            IMAGENET_STD)
    normalizer = Normalizer(list(mean), list(std))
    weights = cfg.weights
    if self_supervised:  # the backbone learns from the images first, without their labels
        weights = pretrained_weights(run, cfg, data, normalizer, device, amp, reporter)
        torch.manual_seed(cfg.seed)  # the head starts as it would without pretraining
    reporter.stage("building model")
    model = build_model(cfg.arch, len(data.classes), weights, cfg.dropout, cfg.freeze_backbone).to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    weight = _class_weights(data).to(device) if cfg.class_weights else None
    train_model = distributed.wrap(model, ranks, device, cfg.batch_norm)
    steps_per_epoch = epoch_batches(len(data.parts["train"]), cfg.batch_size)
    amp_forward = build_forward(train_model, amp, device, cfg.cuda_graphs and not ranks.distributed,
                                cfg.batch_size, reporter.log)
    if isinstance(amp_forward, GraphedForward):
        reporter.log("CUDA graphs: each batch shape's forward and backward is captured once, then replayed "
                     "(cuda_graphs=false turns this off)")
    return Trainer(cfg=cfg, device=device, amp=amp, data=data, normalizer=normalizer,
                   model=model, criterion=build_criterion(cfg.ordinal, weight, cfg.label_smoothing),
                   optimizer=build_optimizer(cfg, model),
                   scaler=torch.amp.GradScaler(device.type, enabled=(amp == torch.float16)),
                   gen=torch.Generator().manual_seed(cfg.seed), augment=build_train_augment(AugmentSpec.from_config(cfg)),
                   steps_per_epoch=steps_per_epoch, ranks=ranks, train_model=train_model,
                   average=build_average(cfg, model, steps_per_epoch),
                   mix=build_mix(MixSpec.from_config(cfg), len(data.classes)), forward=amp_forward)


def build_optimizer(cfg: TrainConfig, model):
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    # On a GPU the fused kernels update every tensor in one launch: measured 1.3-1.8x the training images/s of the
    # default (foreach) update for resnet18 at batch 64-256 on an H100 (bench/RESULTS.md, "GPU").
    fused = {"fused": True} if params and params[0].is_cuda else {}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)


def _class_weights(data: RunData) -> torch.Tensor:
    counts = np.bincount(data.labels[data.parts["train"]], minlength=len(data.classes)).astype(np.float64)
    weights = counts.sum() / (len(counts) * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32)


def restore(run: Run, t: Trainer, reporter: Reporter) -> Progress:
    """The state of the last finished epoch: weights, optimizer, scaler, the shuffling generator, normalization,
    and the history up to it (metrics.csv is written before the checkpoints, so a process killed between the
    two resumes from the older checkpoint and trims the newer history row). The learning rate is not restored:
    schedule.lr_at computes it from the config."""
    if not run.last_path.exists():
        raise TrainingError("this run has no completed epoch to resume from; start a new run instead")
    state, meta, payload = load_checkpoint(run.last_path)
    t.model.load_state_dict(state)
    t.optimizer.load_state_dict(payload["optimizer"])
    if "scaler" in payload:
        t.scaler.load_state_dict(payload["scaler"])
    if "generator" in payload:
        t.gen.set_state(payload["generator"])
    if t.average is not None:  # a run extended with averaging switched on starts its average here
        t.average.load_state_dict(payload.get("averaged", state))
    t.normalizer = Normalizer(meta["normalization"]["mean"], meta["normalization"]["std"])
    epoch = meta["epoch"]
    # An extension starts a new cycle right after this checkpoint: early stopping counts afresh.
    stale = 0 if t.cfg.schedule_start_epoch == epoch else meta.get("stale_epochs", 0)
    progress = Progress(history=run.history()[:epoch], best=meta.get("best", Progress().best), stale=stale)
    reporter.log(f"resuming at epoch {epoch + 1} of {t.cfg.epochs}")
    return progress


# ----------------------------------------------------------------------------------------------------
# One epoch of training; one pass of validation


def train_one_epoch(t: Trainer, epoch: int, reporter: Reporter) -> dict:
    t.train_model.train()
    if t.cfg.batch_norm_frozen:  # the running statistics stay as they are
        for m in t.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    train_idx = t.data.parts["train"]
    order = train_idx[torch.randperm(len(train_idx), generator=t.gen).numpy()]  # the same order on every rank
    # Augmentation draws differ per rank and are a pure function of (seed, epoch, rank): nothing to restore.
    aug_gen = torch.Generator().manual_seed(t.cfg.seed * 1_000_003 + epoch * 1009 + t.ranks.rank)
    bs = t.cfg.batch_size
    batches = [order[i * bs:(i + 1) * bs] for i in range(t.steps_per_epoch)]  # a last batch of one is left out
    lr_first = lr_at(t.cfg, (epoch - 1) * t.steps_per_epoch, t.steps_per_epoch)[0]
    hw = train_hw_at(t.cfg, epoch)  # smaller than the full size in early epochs with progressive resizing
    total_loss, correct, seen = 0.0, 0, 0
    stop, several = False, t.ranks.distributed
    t0 = time.perf_counter()
    for b, global_idx in enumerate(batches):
        if stop or (not several and reporter.should_stop()):
            raise Stopped()
        apply_lr(t.optimizer, *lr_at(t.cfg, (epoch - 1) * t.steps_per_epoch + b, t.steps_per_epoch))
        idx = distributed.shard(global_idx, t.ranks)
        x_u8, y = t.data.batch(idx, t.device)
        x = t.augment(to_unit(x_u8), aug_gen)
        if t.mix is not None:  # the targets become N x classes blends
            x, y = t.mix(x, y, aug_gen)
        x = t.normalizer.normalize(x)
        if x.shape[-2:] != hw:
            x = nn.functional.interpolate(x, size=hw, mode="bilinear", antialias=True, align_corners=False)
        loss_sum, n_correct = _step_with_oom_retry(t, x, y, distributed.loss_weight(len(idx), len(global_idx), t.ranks),
                                                   reporter)
        if t.average is not None:  # every rank holds the same weights after the step, so the same average
            t.average.update((epoch - 1) * t.steps_per_epoch + b)
        # One small all-reduce per step on several devices: the batch's loss and hits, and whether any rank was
        # asked to stop (so that all stop after the same batch).
        loss_sum, n_correct, stops = distributed.sum_across(
            [loss_sum, n_correct, float(several and reporter.should_stop())], t.ranks)
        stop = stops > 0
        if not math.isfinite(loss_sum):
            raise TrainingError(f"training diverged: the loss became {loss_sum} at epoch {epoch}, batch {b + 1}. "
                                "No checkpoint was written for it; lower the learning rate and try again.")
        total_loss += loss_sum
        correct += int(n_correct)
        seen += len(global_idx)
        reporter.batch(epoch, b + 1, len(batches), seen / max(time.perf_counter() - t0, 1e-9))
    seconds = time.perf_counter() - t0
    return {"train_loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1), "lr": lr_first,
            "train_size": hw[0],
            "train_seconds": seconds, "images_per_s": seen / max(seconds, 1e-9)}


def _step_with_oom_retry(t: Trainer, x, y, weight: float, reporter: Reporter) -> tuple[float, int]:
    """One step; after a CUDA out-of-memory the batch is split in 2, 4, ... parts (same effective batch)."""
    while True:
        try:
            return train_step(t.train_model, t.criterion, t.optimizer, t.scaler, x, y, t.amp, t.micro_batches, weight,
                              forward=t.forward)
        except torch.OutOfMemoryError:
            t.optimizer.zero_grad(set_to_none=True)
            if t.device.type == "cuda":
                torch.cuda.empty_cache()
            t.oom_retries += 1
            if t.oom_retries > MAX_OOM_HALVINGS or t.micro_batches * 2 > len(y):
                raise TrainingError(f"out of GPU memory even with the batch split {t.micro_batches} ways; "
                                    "lower batch_size or image_size") from None
            t.micro_batches *= 2
            reporter.log(f"out of memory: batch now processed in {t.micro_batches} parts (same effective batch size)")


def train_step(model, criterion, optimizer, scaler, x, y, amp, parts: int, weight: float = 1.0,
               forward: EagerForward | None = None) -> tuple[float, int]:
    """One optimizer step on a batch (in `parts` micro-batches). Returns the summed loss and the hits.
    `weight`: this device's share of the step on several devices (distributed.loss_weight). `forward`: the
    model's float logits under autocast (core/train/graphs.py; built here when not given)."""
    forward = forward or EagerForward(model, amp)
    optimizer.zero_grad(set_to_none=True)
    loss_total, correct = 0.0, 0
    n = len(y)
    for xs, ys in zip(x.chunk(parts), y.chunk(parts)):
        logits = forward(xs)
        loss = criterion(logits, ys)  # on float32 logits, as autocast runs cross-entropy
        scaler.scale(loss * (weight * len(ys) / n)).backward()
        loss_total += loss.item() * len(ys)
        # Blended targets (mixup / CutMix) count a hit on the larger share: train accuracy stays a rough guide.
        correct += (logits.argmax(1) == (ys.argmax(1) if ys.ndim == 2 else ys)).sum().item()
    scaler.step(optimizer)
    scaler.update()
    return loss_total, correct


def validate(t: Trainer, part: str, reporter: Reporter, model: nn.Module | None = None) -> dict:
    """Loss and accuracy of the trained weights (or of `model`: the averaged ones) on a split part, through the
    one inference path (without TTA: it is for the test). On several devices each rank scores its share with
    rank 0's weights and statistics, and all get all scores."""
    model = t.model if model is None else model
    idx = t.data.parts[part]
    distributed.sync_buffers(model, t.ranks)
    mine = distributed.shard(idx, t.ranks)
    # A stop inside validation is seen by one process at a time; on several devices it waits for the next batch.
    check = None if t.ranks.distributed else _stop_check(reporter)
    probs = [forward_probs(model, x, t.normalizer, t.amp).cpu()
             for x in t.data.batches(mine, max(t.cfg.batch_size, 64), t.device, check)]
    p = torch.cat(probs).numpy() if probs else np.zeros((0, len(t.data.classes)), dtype=np.float32)
    p = distributed.gather_rows(p, t.ranks).astype(np.float64)  # in rank order: the order of idx
    acc, loss = accuracy_and_loss(p, t.data.labels[idx])
    return {f"{part}_loss": loss, f"{part}_acc": acc}


def validate_average(t: Trainer, reporter: Reporter) -> dict:
    """validate() for the averaged weights. SWA's mean weights first get batch-norm statistics of their own, from
    a pass over the training part (every rank the whole part, so that all hold the same); where batch norm is
    frozen the statistics stay the pretrained ones."""
    if t.cfg.swa_epochs and not t.cfg.batch_norm_frozen:
        reporter.stage("batch-norm statistics of the averaged weights")
        check = _stop_check(reporter)
        with autocast(t.device, t.amp):
            t.average.recompute_batch_norm(
                t.normalizer(x) for x in t.data.batches(t.data.parts["train"], max(t.cfg.batch_size, 64), t.device,
                                                         check))
    return validate(t, "val", reporter, t.average.model)


def accuracy_and_loss(p: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    p_true = np.clip(p[np.arange(len(y)), y], 1e-12, 1.0)
    return float((p.argmax(1) == y).mean()), float(-np.log(p_true).mean())


def choose_tta_views(run: Run, t: Trainer, reporter: Reporter) -> str:
    """cfg.tta_views "auto": score the best checkpoint on the validation part with the image alone, its flips and
    (square inputs) its 8 flips and quarter turns; the views that validate best (accuracy, then loss; a tie goes to
    fewer views) are written into best.pt's metadata, which every later use of the model reads
    (inference.run_tta). The main process alone, after the epochs."""
    model, meta = model_from_checkpoint(run.best_path)
    model.to(t.device).to(memory_format=torch.channels_last)
    idx = t.data.parts["val"]
    candidates = ["none", "flips"] + (["dihedral"] if t.cfg.input_hw[0] == t.cfg.input_hw[1] else [])
    scores = {}
    for views in candidates:
        probs = [forward_probs(model, x, t.normalizer, t.amp, views != "none", views).cpu()
                 for x in t.data.batches(idx, max(t.cfg.batch_size, 64), t.device)]
        acc, loss = accuracy_and_loss(torch.cat(probs).double().numpy(), t.data.labels[idx])
        scores[views] = {"val_acc": round(acc, 4), "val_loss": round(loss, 4)}
    chosen = candidates[0]
    for views in candidates[1:]:
        if _better(scores[views]["val_acc"], scores[views]["val_loss"], scores[chosen]["val_acc"],
                   scores[chosen]["val_loss"]):
            chosen = views
    save_checkpoint(run.best_path, model.state_dict(), {**meta, "tta_views": chosen, "tta_validation": scores})
    reporter.log("test-time augmentation chosen on validation: " + chosen + " (" + ", ".join(
        f"{v} {s['val_acc']:.3f}" for v, s in scores.items()) + ")")
    return chosen


def _stop_check(reporter: Reporter):
    def check():
        if reporter.should_stop():
            raise Stopped()
    return check


# ----------------------------------------------------------------------------------------------------
# Recording an epoch


def _better(acc: float, loss: float, than_acc: float, than_loss: float) -> bool:
    """Validation accuracy decides, then loss on a tie."""
    return acc > than_acc or (acc == than_acc and loss < than_loss)


def kept_weights(row: dict) -> tuple[str, float, float]:
    """("trained" or "averaged", val accuracy, val loss): the weights an epoch keeps. With weight averaging on,
    the averaged ones when they validate better."""
    if "avg_val_acc" in row and _better(row["avg_val_acc"], row["avg_val_loss"], row["val_acc"], row["val_loss"]):
        return "averaged", row["avg_val_acc"], row["avg_val_loss"]
    return "trained", row["val_acc"], row["val_loss"]


def update_progress(progress: Progress, row: dict, cfg: TrainConfig) -> bool:
    """Append the epoch; return whether it is the new best (validation accuracy, then loss on a tie, of the
    weights the epoch keeps: kept_weights)."""
    progress.history.append(row)
    best = progress.best
    weights, acc, loss = kept_weights(row)
    improved = _better(acc, loss, best["val_acc"], best["val_loss"])
    if improved:
        progress.best = best = {**best, "val_acc": acc, "val_loss": loss, "epoch": row["epoch"], "weights": weights}
    monitored = acc if cfg.early_stop_metric == "val_acc" else -loss
    if monitored > best.get("monitor", -float("inf")):
        best["monitor"] = monitored
        progress.stale = 0
    elif row.get("train_size", cfg.input_hw[0]) < cfg.input_hw[0]:
        # Trained on smaller images (progressive resizing) and validated at the full size, which the weights have
        # not seen yet: such epochs read low (ELPV: 31% after epoch 2, 62% at their own size;
        # bench/progressive_validation.py), so early stopping's patience starts at the full size.
        progress.stale = 0
    else:
        progress.stale += 1
    return improved


def checkpoint_meta(run: Run, t: Trainer, progress: Progress, row: dict) -> dict:
    return {"run_id": run.id, "classes": t.data.classes, "config": t.cfg.to_dict(),
            "normalization": {"mean": t.normalizer.mean, "std": t.normalizer.std},
            "input_hw": list(t.cfg.input_hw), "epoch": row["epoch"], "metrics": row, "best": progress.best,
            "stale_epochs": progress.stale, "device": t.device.type, "torch": torch.__version__}


def best_state(t: Trainer, progress: Progress) -> dict:
    """The state_dict of the weights the best epoch kept (trained or averaged), when that epoch is this one."""
    averaged = progress.best.get("weights") == "averaged" and t.average is not None
    return t.average.state_dict() if averaged else t.model.state_dict()


def save_checkpoints(run: Run, t: Trainer, progress: Progress, row: dict, improved: bool) -> None:
    meta = checkpoint_meta(run, t, progress, row)
    if improved:
        save_checkpoint(run.best_path, best_state(t, progress), meta)
    save_checkpoint(run.last_path, t.model.state_dict(), meta, optimizer=t.optimizer.state_dict(),
                    scaler=t.scaler.state_dict() if t.scaler.is_enabled() else None, generator=t.gen.get_state(),
                    averaged=t.average.state_dict() if t.average is not None else None)


# Writing checkpoints may take at most about 1/(1 + WRITE_EVERY_COST) of a run's time.
WRITE_EVERY_COST = 9


def checkpoint_due(final: bool, since_last_write_s: float | None, last_write_s: float) -> bool:
    """Whether an epoch's checkpoints are written now: on the first epoch, the final one, and otherwise once the
    time since the last write is WRITE_EVERY_COST times what that write took. Where an epoch takes minutes (any
    CPU run on real data) that is every epoch; where it takes less than writing last.pt with its optimizer state
    (seen on a GPU: a 0.4 s ELPV epoch, a 0.3 s write) writing stays about a tenth of the time."""
    return final or since_last_write_s is None or since_last_write_s >= WRITE_EVERY_COST * last_write_s


class CheckpointPacer:
    """Writes an epoch's checkpoints when checkpoint_due says so. A better epoch in between is held in memory
    (a copy of its weights, on the training device) and written with the next write, or by `flush` when the loop
    ends for any reason: stop, failure, the last epoch. A process killed outright loses at most the epochs since
    the last write; resume then starts after last.pt's epoch (restore() trims the history to it)."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.last_end: float | None = None
        self.last_cost = 0.0
        self.pending_best: tuple[dict, dict] | None = None

    def epoch_end(self, run: Run, t: Trainer, progress: Progress, row: dict, improved: bool, final: bool) -> None:
        now = self.clock()
        if not checkpoint_due(final, None if self.last_end is None else now - self.last_end, self.last_cost):
            # Weights gone NaN fail the run at this epoch, as a write would have (and are never held as the best).
            refuse_nonfinite(t.model.state_dict(), run.last_path.name)
            if improved:
                state = best_state(t, progress)
                refuse_nonfinite(state, run.best_path.name)
                held = {k: v.detach().clone() for k, v in state.items()}
                self.pending_best = (held, checkpoint_meta(run, t, progress, row))
            return
        if improved:
            self.pending_best = None  # superseded by this epoch's best.pt
        else:
            self._write_pending(run)
        save_checkpoints(run, t, progress, row, improved)
        self.last_end = self.clock()
        self.last_cost = self.last_end - now

    def _write_pending(self, run: Run) -> None:
        if self.pending_best is not None:
            state, meta = self.pending_best
            self.pending_best = None
            save_checkpoint(run.best_path, state, meta)

    def flush(self, run: Run, reporter: Reporter) -> None:
        try:
            self._write_pending(run)
        except CheckpointError as exc:  # the loop is ending anyway (maybe on another error): say so, keep going
            reporter.log(f"the best epoch's checkpoint could not be written: {exc}")


def epoch_line(row: dict, epochs: int, improved: bool) -> str:
    averaged = (f" | averaged: val loss {row['avg_val_loss']:.4f} acc {row['avg_val_acc']:.3f}"
                if "avg_val_acc" in row else "")
    return (f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f} | "
            f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f}{averaged} | {row['seconds']:.1f}s, "
            f"{row['images_per_s']:.0f} img/s" + (" *best*" if improved else ""))
