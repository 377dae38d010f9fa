"""How long a training run will take on this machine, said before it starts.

The engine's own training step (batch conversion, augmentation, normalization, forward, backward, update) is timed
for a few batches at the config's image size, batch size, architecture and precision; the decoder is timed on a
few of the dataset's files. The estimate is then arithmetic (`estimate_seconds`, a pure function): training and
validation images per epoch, the checkpoints written (timed too: on a GPU an epoch of a small set can take less
than writing last.pt), the final evaluation, and the first decode unless the images are already cached.
"""
from __future__ import annotations

import json
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch

from core.config import TrainConfig
from core.data.cache import decode_workers
from core.data.images import ImageLoadError, load_array
from core.data.labels import LabelStore
from core.data.sources import load_dataset
from core.data.split import stratified_split
from core.data.transforms import AugmentSpec, MixSpec, Normalizer, build_mix, build_train_augment, to_unit
from core.models.device import autocast_dtype, select_device
from core.models.resnet import build_model
from core.train.averaging import build_average, extra_eval_images
from core.train.graphs import build_forward
from core.train.loop import WRITE_EVERY_COST, build_optimizer, train_step
from core.train.pretrain import pretraining_seconds
from core.train.schedule import cycle_first_epoch, mean_pixel_fraction, train_hw_at

EVAL_COST = 1 / 3  # a forward pass per image costs about a third of a training step's (forward + backward)


def training_images_per_s(cfg: TrainConfig, device: torch.device | None = None, steps: int = 4) -> float:
    """Training images per second of the engine's step at this config's size, batch, model and precision."""
    return _timed_training_steps(cfg, device, steps)[0]


def _timed_training_steps(cfg: TrainConfig, device: torch.device | None = None, steps: int = 4):
    """(images per second, the model, its optimizer): the engine's step timed with the optimizer training builds
    (fused on a GPU), the model and optimizer then as large as after any step."""
    device = device or select_device(cfg.device)
    model = build_model(cfg.arch, 2, "none").to(device).to(memory_format=torch.channels_last)
    opt = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    amp = autocast_dtype(device, cfg.amp)
    augment = build_train_augment(AugmentSpec.from_config(cfg))
    normalizer = Normalizer([0.5] * 3, [0.25] * 3)
    gen = torch.Generator().manual_seed(0)
    h, w = cfg.input_hw
    x_u8 = torch.randint(0, 256, (cfg.batch_size, h, w, 3), dtype=torch.uint8, device=device)
    y = torch.zeros(cfg.batch_size, dtype=torch.long, device=device)
    average = build_average(cfg, model, 100)
    mix = build_mix(MixSpec.from_config(cfg), 2)
    forward = build_forward(model, amp, device, cfg.cuda_graphs, cfg.batch_size, log=lambda _: None)
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        x, target = augment(to_unit(x_u8), gen), y
        if mix is not None:
            x, target = mix(x, y, gen)
        # .item() inside syncs CUDA too
        train_step(model, torch.nn.CrossEntropyLoss(), opt, scaler, normalizer.normalize(x), target, amp, 1,
                   forward=forward)
        if average is not None:
            average.update(i)
        if i >= 2:  # the first steps pick and cache kernels (and capture the CUDA graph)
            times.append(time.perf_counter() - t)
    return cfg.batch_size / float(np.median(times)), model, opt


def checkpoint_write_seconds(model: torch.nn.Module, opt: torch.optim.Optimizer) -> float:
    """Seconds to write one epoch's checkpoints as training does (best.pt, then last.pt with the optimizer's
    state) for a model and optimizer that have taken a step, in the system's temporary folder (one try: about
    0.4 s on an H100 machine's disk)."""
    from core.models.checkpoint import save_checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        save_checkpoint(f"{tmp}/best.pt", model.state_dict(), {})
        save_checkpoint(f"{tmp}/last.pt", model.state_dict(), {}, optimizer=opt.state_dict())
        return time.perf_counter() - t


def decode_seconds_per_image(paths: list[str], hw: tuple[int, int], per_worker: int = 4) -> float:
    """Wall-clock seconds per image when a sample of these files is opened and resized as the cache does it, on its
    threads (decode_workers). Timed through the threads rather than divided by their count: on a GPU machine's 16
    cores decoding ELPV ran at a fifth of 16 threads' worth (Python's share of each image holds the GIL)."""
    workers = decode_workers()
    sample = paths[:: max(1, len(paths) // (per_worker * workers))][:per_worker * workers]

    def one(path):
        try:
            load_array(path, hw)
        except ImageLoadError:
            pass
    if not sample:
        return 0.0
    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, sample))
    return (time.perf_counter() - t) / len(sample)


def estimate_seconds(epochs: int, n_train: int, n_val: int, n_test: int, images_per_s: float,
                     decode_s_per_image: float = 0.0, tta: bool = False, workers: int = 1,
                     train_pixels: float = 1.0, write_s: float = 0.0, tta_views: str = "flips") -> float:
    """Wall-clock seconds of a run: the first decode of every image (`decode_s_per_image` each, shared by `workers`
    threads; 0 when cached; decode_seconds_per_image already times the threads, so its callers pass 1), each
    epoch's training, validation and checkpoints, and the final evaluation (three passes with TTA).
    `train_pixels`: the training time relative to every epoch at the full size (below 1 with progressive resizing:
    progressive_time_fraction). `write_s`: one epoch's checkpoint writes; an epoch shorter than
    WRITE_EVERY_COST writes is not written every time (train.checkpoint_due), so writing adds at most a
    WRITE_EVERY_COST-th of its time. `tta_views`: flips (3 passes), dihedral (8), or auto (the validation part
    scored once with each of the 1 + 3 + 8 views, then at most 8 passes)."""
    decode = (n_train + n_val + n_test) * decode_s_per_image / max(workers, 1)
    epoch = n_train * train_pixels / images_per_s + n_val * EVAL_COST / images_per_s
    epoch += min(write_s, epoch / WRITE_EVERY_COST)
    passes = {"flips": 3, "dihedral": 8, "auto": 8}[tta_views] if tta else 1
    final = n_test * EVAL_COST * passes / images_per_s
    if tta and tta_views == "auto":
        final += n_val * EVAL_COST * 12 / images_per_s
    return decode + epochs * epoch + final


def progressive_time_fraction(cfg: TrainConfig, images_per_s: float, start_images_per_s: float = 0.0) -> float:
    """The run's training time relative to every epoch at the full size, with progressive resizing. A step's time
    per image is taken as affine in its pixels, through the two sizes timed (the full one and the first epoch's):
    on a GPU a small batch costs nearly what a full one does (kernel launches, not pixels), on a CPU about its
    pixels. Without the second timing: the pixels alone (schedule.mean_pixel_fraction)."""
    first = cycle_first_epoch(cfg)
    h, w = cfg.input_hw
    sh, sw = train_hw_at(cfg, first)
    p0 = sh * sw / (h * w)
    if start_images_per_s <= 0 or images_per_s <= 0 or p0 >= 1:
        return mean_pixel_fraction(cfg)
    t_full, t_start = 1 / images_per_s, 1 / start_images_per_s
    slope = (t_full - t_start) / (1 - p0)
    per_epoch = [t_start + slope * (eh * ew / (h * w) - p0) for eh, ew in
                 (train_hw_at(cfg, e) for e in range(first, cfg.epochs + 1))]
    return max(float(np.mean(per_epoch)), 0.0) / t_full


@dataclass
class Estimate:
    seconds: float
    images_per_s: float
    decode_s_per_image: float
    counts: dict
    write_s: float = 0.0   # one epoch's checkpoint writes
    start_images_per_s: float = 0.0  # at the first epoch's size with progressive resizing (0: not timed)
    takes: int = 1  # how many timings of the step images_per_s is the fastest of

    def text(self) -> str:
        minutes = self.seconds / 60
        when = f"about {minutes:.0f} minutes" if minutes >= 1.5 else f"about {self.seconds:.0f} seconds"
        return (f"{when} on this machine ({self.images_per_s:.0f} training images/s measured; "
                f"{self.counts['train']} training, {self.counts['val']} validation, {self.counts['test']} test images)")


def dataset_parts(ws, cfg: TrainConfig) -> tuple[dict, list[str], int]:
    """(images per split part, every image's path, class count) of the config's dataset as a new run would split
    it, with the label store's labels."""
    ds = LabelStore(ws).apply(load_dataset(cfg.data))
    split = stratified_split(ds, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    return {part: len(idx) for part, idx in split.items()}, [s.path for s in ds.samples], len(ds.classes)


def run_seconds(cfg: TrainConfig, counts: dict, images_per_s: float, decode_s_per_image: float,
                write_s: float = 0.0, start_images_per_s: float = 0.0) -> float:
    """estimate_seconds for this config's epochs, TTA and progressive resizing, decoding on the cache's threads,
    plus self-supervised pretraining when the config asks for it."""
    n_val = counts["val"] + extra_eval_images(cfg, counts["train"], counts["val"])  # weight averaging's passes
    return estimate_seconds(cfg.epochs, counts["train"], n_val, counts["test"], images_per_s,
                            decode_s_per_image, cfg.tta,  # decode_s_per_image was timed on the cache's threads
                            train_pixels=progressive_time_fraction(cfg, images_per_s, start_images_per_s),
                            write_s=write_s, tta_views=cfg.tta_views
                            ) + pretraining_seconds(cfg, counts["train"] + counts.get("unlabeled", 0), images_per_s)


# A step's speed is the machine's and the step's (model, size, batch, precision, augmentation, optimizer), not the
# dataset's: the Train page times the auto recipe of every dataset picked, so a timing is kept in this process for
# STEP_TIMING_TTL_S and picking another dataset of the same shape does not time it again. Two timings of one shape
# keep the faster: another process on the machine only ever makes a step slower.
STEP_TIMING_TTL_S = 600.0
NOT_THE_STEP = ("data", "epochs", "seed", "split_seed", "val_fraction", "test_fraction", "extra")


@dataclass
class StepTiming:
    images_per_s: float
    start_images_per_s: float  # at the first epoch's size with progressive resizing (0: not timed)
    write_s: float             # one epoch's checkpoint writes
    takes: int                 # how many timings this is the fastest of
    at: float                  # time.monotonic() of the last


_step_timings: dict[str, StepTiming] = {}
_step_timings_lock = threading.Lock()


def step_key(cfg: TrainConfig) -> str:
    return json.dumps({k: v for k, v in cfg.to_dict().items() if k not in NOT_THE_STEP}, sort_keys=True, default=str)


def time_step(cfg: TrainConfig, fresh: bool = False) -> StepTiming:
    """The training step's speed at this config's shape (and at its first epoch's size with progressive resizing)
    and its checkpoint writes: kept from a timing of the last STEP_TIMING_TTL_S unless `fresh`."""
    key = step_key(cfg)
    with _step_timings_lock:
        known = _step_timings.get(key)
    if known is not None and time.monotonic() - known.at >= STEP_TIMING_TTL_S:
        known = None
    if known is not None and not fresh:
        return known
    ips, model, opt = _timed_training_steps(cfg)
    start_ips = 0.0
    sh, sw = train_hw_at(cfg, cycle_first_epoch(cfg))
    if (sh, sw) != cfg.input_hw:  # the first epochs' size too: their steps cost more than their pixels say
        start_ips = _timed_training_steps(replace(cfg, image_height=sh, image_width=sw, progressive_start=1.0))[0]
    timing = StepTiming(ips, start_ips, checkpoint_write_seconds(model, opt), 1, time.monotonic())
    if known is not None:
        timing = StepTiming(max(ips, known.images_per_s), max(start_ips, known.start_images_per_s),
                            min(timing.write_s, known.write_s), known.takes + 1, timing.at)
    with _step_timings_lock:
        _step_timings[key] = timing
    return timing


def measure(cfg: TrainConfig, counts: dict, paths: list[str], fresh: bool = False) -> Estimate:
    """Time the training step (see time_step) and the decoder for this config, and estimate its run."""
    step = time_step(cfg, fresh)
    decode = decode_seconds_per_image(paths, cfg.input_hw)
    seconds = run_seconds(cfg, counts, step.images_per_s, decode, step.write_s, step.start_images_per_s)
    return Estimate(seconds, step.images_per_s, decode, counts, step.write_s, step.start_images_per_s, step.takes)


def estimate_run(ws, cfg: TrainConfig) -> Estimate:
    """The estimate for a config, from its dataset's split (with the label store's labels) and timed steps."""
    counts, paths, _ = dataset_parts(ws, cfg)
    return measure(cfg, counts, paths)
