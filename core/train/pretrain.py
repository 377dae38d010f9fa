"""Self-supervised pretraining on the dataset's own images (SimCLR, Chen et al. 2020), for users who cannot start
from ImageNet weights.

A run whose config says weights="self-supervised" first trains its backbone without labels: each image of the
training part (and the dataset's unlabeled images) is augmented twice, and the network learns to tell which two
views in a batch come from the same image (the NT-Xent loss over a projection head). The backbone is saved with the
run (pretrained.pt, a state_dict without the head, loadable as any weights file) and the usual fine-tuning starts
from it. Validation and test images are never seen here, so the test part stays unseen until the end.

The views use the flips and quarter turns the run's own config allows (a part with no "up" may turn; a scene
may not) plus what SimCLR needs to make the task hard: a random crop of a quarter of the image or more, and
brightness/contrast jitter. They run at cfg.ssl_image_size (smaller than the training size is cheaper; the
pooled backbone does not depend on the size).
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.config import TrainConfig
from core.data.cache import Stopped
from core.data.transforms import AugmentSpec, Normalizer, build_train_augment, to_unit
from core.models.checkpoint import save_checkpoint
from core.models.device import autocast
from core.models.resnet import build_model
from core.runs.life import TrainingError

SELF_SUPERVISED = "self-supervised"  # the cfg.weights value that asks for it
TEMPERATURE = 0.2       # of the NT-Xent softmax (SimCLR's ablations: 0.1-0.5; lower suits smaller batches)
LR = 1e-3               # AdamW, warmed up over the first 10% of the steps, then cosine to zero
WEIGHT_DECAY = 1e-4
WARMUP = 0.1
PROJECTION_DIM = 128    # SimCLR's projection head: 512 -> 512 -> 128
VIEW_CROP_MIN = 0.25    # the random crop keeps at least this fraction of the area
VIEW_JITTER = 0.4       # brightness / contrast / saturation strength


def view_spec(cfg: TrainConfig) -> AugmentSpec:
    """The two views' augmentation: the config's own flips, turns and rotation, plus crop and jitter."""
    return AugmentSpec(hflip=cfg.hflip, vflip=cfg.vflip, rotation=cfg.rotation, rot90=cfg.rot90,
                       crop_scale_min=min(cfg.crop_scale_min, VIEW_CROP_MIN),
                       color_jitter=max(cfg.color_jitter, VIEW_JITTER))


def projection_head(in_features: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, in_features), nn.BatchNorm1d(in_features), nn.ReLU(inplace=True),
                         nn.Linear(in_features, PROJECTION_DIM))


def nt_xent(z: torch.Tensor, temperature: float = TEMPERATURE) -> tuple[torch.Tensor, float]:
    """SimCLR's loss for 2N projections, the first N and the last N being the two views of N images: each view's
    cross-entropy at picking its partner among the 2N - 1 others by cosine similarity. Returns (loss, the fraction
    of views whose most similar other view is their partner)."""
    n = z.shape[0] // 2
    z = F.normalize(z.float(), dim=1)
    sim = (z @ z.t()) / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    match = (sim.argmax(1) == partner).float().mean().item()
    return F.cross_entropy(sim, partner), match


def lr_at(step: int, total: int) -> float:
    """The pretraining learning rate at a step: a pure function, as the training schedule's."""
    warm = max(1, int(WARMUP * total))
    if step < warm:
        return LR * (step + 1) / warm
    return LR * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def pretraining_images(data) -> np.ndarray:
    """The samples pretraining may look at: the training part and the unlabeled images, never validation or test."""
    parts = [data.parts["train"]] + ([data.parts["unlabeled"]] if "unlabeled" in data.parts else [])
    return np.concatenate(parts)


def pretrain_backbone(cfg: TrainConfig, data, normalizer: Normalizer, device: torch.device, amp, reporter) -> tuple[dict, dict]:
    """Train a backbone on two views per image for cfg.ssl_epochs. Returns (its state_dict without the head,
    a summary). Raises data.Stopped when the reporter asks to stop."""
    idx = pretraining_images(data)
    bs = min(cfg.ssl_batch_size, len(idx))
    if bs < 2:
        raise TrainingError("self-supervised pretraining needs at least 2 training images")
    steps_per_epoch = max(1, len(idx) // bs)  # full batches only: every batch has the same number of negatives
    total = cfg.ssl_epochs * steps_per_epoch
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, 1, "none")
    model.fc = projection_head(model.fc.in_features)
    model.to(device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    augment = build_train_augment(view_spec(cfg))
    gen = torch.Generator().manual_seed(cfg.seed + 7919)
    size = (cfg.ssl_image_size, cfg.ssl_image_size)
    reporter.log(f"self-supervised pretraining: {len(idx)} images, {cfg.ssl_epochs} epochs of {steps_per_epoch} "
                 f"steps, batch {bs} (two views each) at {size[0]} px")
    t_start, history = time.perf_counter(), []
    for epoch in range(1, cfg.ssl_epochs + 1):
        t0, losses, matches = time.perf_counter(), [], []
        order = idx[torch.randperm(len(idx), generator=gen).numpy()]
        for b in range(steps_per_epoch):
            if reporter.should_stop():
                raise Stopped()
            for group in opt.param_groups:
                group["lr"] = lr_at((epoch - 1) * steps_per_epoch + b, total)
            x_u8, _ = data.batch(order[b * bs:(b + 1) * bs], device)
            x = to_unit(x_u8)
            if x.shape[-2:] != size:  # shrink once, then both views are cut from the small image
                x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
            views = torch.cat([normalizer.normalize(augment(x, gen)), normalizer.normalize(augment(x, gen))])
            opt.zero_grad(set_to_none=True)
            with autocast(device, amp):
                z = model(views.contiguous(memory_format=torch.channels_last))
            loss, match = nt_xent(z)
            if not torch.isfinite(loss):
                raise TrainingError(f"self-supervised pretraining diverged at epoch {epoch}, step {b + 1}: lower "
                                    "ssl_batch_size or turn off mixed precision (--amp off)")
            loss.backward()
            opt.step()
            losses.append(loss.item())
            matches.append(match)
            reporter.stage("self-supervised pretraining", (epoch - 1) * steps_per_epoch + b + 1, total)
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch, "loss": float(np.mean(losses)), "view_match": float(np.mean(matches)),
               "seconds": seconds}
        history.append(row)
        reporter.log(f"self-supervised epoch {epoch}/{cfg.ssl_epochs}: contrastive loss {row['loss']:.4f}, "
                     f"partner found {row['view_match']:.3f} | {seconds:.1f}s, "
                     f"{2 * steps_per_epoch * bs / max(seconds, 1e-9):.0f} views/s")
    backbone = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith("fc.")}
    summary = {"kind": "self-supervised backbone", "method": "SimCLR (NT-Xent)", "arch": cfg.arch,
               "images": int(len(idx)), "epochs": cfg.ssl_epochs, "image_size": cfg.ssl_image_size,
               "batch_size": bs, "seconds": round(time.perf_counter() - t_start, 1), "history": history}
    return backbone, summary


def pretrained_weights(run, cfg: TrainConfig, data, normalizer: Normalizer, device: torch.device, amp,
                       reporter) -> str:
    """The path of the run's self-supervised backbone: pretrained now, or earlier in this run (a resumed run
    does not pretrain again)."""
    path = run.pretrained_path
    if path.exists():
        reporter.log(f"starting from this run's self-supervised backbone ({path.name})")
        return str(path)
    reporter.stage("self-supervised pretraining")
    state, summary = pretrain_backbone(cfg, data, normalizer, device, amp, reporter)
    save_checkpoint(path, state, summary)
    reporter.log(f"self-supervised pretraining took {summary['seconds'] / 60:.1f} min; fine-tuning starts from it")
    return str(path)


def pretraining_seconds(cfg: TrainConfig, n_images: int, images_per_s: float) -> float:
    """About how long pretraining takes, from the training step's measured speed at the training size: two views
    per image, at ssl_image_size (cost about in proportion to the pixels)."""
    if str(cfg.weights).strip().lower() != SELF_SUPERVISED:
        return 0.0
    h, w = cfg.input_hw
    pixels = cfg.ssl_image_size ** 2 / (h * w)
    return cfg.ssl_epochs * 2 * n_images * pixels / max(images_per_s, 1e-9)
