"""One training config with the seed notebooks' defaults, plus validation.

Every field has a default a beginner can keep; comments say where it comes from.
The config is stored as config.json with each run, so a run can always be re-created.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

from core.errors import UserError

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet18-custom")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "cosine", "step", "onecycle")
NORMALIZATIONS = ("imagenet", "dataset")
AMP_MODES = ("auto", "bf16", "fp16", "off")
EARLY_STOP_METRICS = ("val_acc", "val_loss")
DEVICES = ("auto", "cpu", "cuda", "mps")
BATCH_NORMS = ("auto", "sync", "local", "frozen")
SPLIT_GROUPS = ("none", "duplicates", "origin")
TTA_VIEWS = ("flips", "dihedral", "auto")

# What a run is (its config's extra["kind"]; a plain training's config has none): a training, or a job that trains
# several models to study a dataset or a run. Read through TrainConfig.kind.
TRAINING, CROSSVAL, LEARNING_CURVE = "train", "crossval", "learning_curve"
RUN_KIND_NAMES = {TRAINING: "training", CROSSVAL: "crossval", LEARNING_CURVE: "learning curve"}


class ConfigError(UserError, ValueError):
    """A config field has a value training cannot use; the message names the field."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def _need(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(name, msg)


@dataclass
class TrainConfig:
    # --- data ---
    data: str = ""                   # folder, CSV file, or a built-in name: "elpv" / "elpv4"
    image_size: int = 224            # square side in pixels (seeds: 224)
    image_height: int = 0            # set both height and width for a non-square input (0: use image_size)
    image_width: int = 0
    val_fraction: float = 0.15       # carved out of the data when the source has no val split
    test_fraction: float = 0.15      # carved out when the source has no test split
    split_seed: int = 42             # the split is saved with the run, so this only matters for new runs
    split_groups: str = "none"       # "duplicates": near-duplicate images (perceptual hash within
                                     # duplicate_distance bits) go to one part together, so none is tested on its
                                     # twin; "origin": the images of one module/batch/day (a CSV's group column, or
                                     # the sub-folder inside each class folder) go to one part together
    duplicate_distance: int = 2      # most differing bits of 64-bit perceptual hashes (core/data/duplicates.py). On
                                     # ELPV (cells that all look alike) pairs within 2 bits are sister cells with
                                     # one grain pattern; at 4 groups start to chain (23 cells in one), at 6 (363)
    normalization: str = "imagenet"  # "imagenet" mean/std, or "dataset": computed on the training split
    # --- augmentation (applied on batched tensors, train split only) ---
    hflip: bool = True               # seeds: RandomHorizontalFlip
    vflip: bool = False
    rotation: float = 0.0            # max degrees of random rotation (seeds: 10-15)
    rot90: bool = False              # random multiples of 90 degrees (for square, orientation-free parts)
    crop_scale_min: float = 1.0      # random resized crop keeps this fraction of the area at least (1.0: off)
    progressive_start: float = 1.0   # progressive resizing (fast.ai, FFCV): the first epochs train at this fraction
                                     # of the image size, growing to the full size by 3/4 of the epochs; validation
                                     # and test always run at the full size (1.0: off)
    color_jitter: float = 0.0        # brightness/contrast/saturation strength (0: off)
    # Mixup / CutMix lost accuracy on ELPV and on digits (bench/RESULTS.md): kept for experiments (--set), not on
    # the Train page.
    mixup: float = 0.0               # mixup: each batch blended with itself reversed by lam ~ Beta(mixup, mixup),
                                     # targets alike (timm's default 0.8; 0: off)
    cutmix: float = 0.0              # CutMix: a box of the reversed batch pasted in, lam ~ Beta(cutmix, cutmix)
                                     # (timm's default 1.0; 0: off). Both on: half the batches each
    # --- model ---
    arch: str = "resnet18"           # resnet18 | resnet34 | resnet50 | resnet18-custom (hand-built, [2,2,2,2])
    weights: str = "imagenet"        # "imagenet", "none" (from scratch), "self-supervised" (pretrained first on
                                     # the run's own training and unlabeled images, without labels: core/train/pretrain.py),
                                     # or a path to a state_dict file
    ssl_epochs: int = 20             # self-supervised pretraining: passes over those images, two views of each
    ssl_image_size: int = 64         # ... at this side in pixels (the pooled backbone works at any size; smaller
                                     # pretrains faster)
    ssl_batch_size: int = 128        # ... images per step: each view's negatives are the other 2 x 127 views
    dropout: float = 0.0             # dropout before the final layer
    freeze_backbone: bool = False    # True: train only the new head (feature extraction)
    # --- optimisation (seeds: Adam, lr 1e-3, 10 epochs, batch 32, cross-entropy) ---
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"          # adam | adamw | sgd (momentum 0.9)
    momentum: float = 0.9            # SGD only
    weight_decay: float = 0.0
    schedule: str = "none"           # none | cosine | step | onecycle
    step_size: int = 5               # epochs between lr drops for "step"
    step_gamma: float = 0.1
    label_smoothing: float = 0.0
    class_weights: bool = False      # weight the loss by inverse class frequency (imbalanced sets)
    ordinal: bool = False            # the classes are ordered grades, in their sorted names' order: the loss also
                                     # charges for how many grades off a prediction is (core/train/losses.py)
    early_stop_patience: int = 0     # epochs without improvement before stopping (0: off)
    early_stop_metric: str = "val_acc"
    ema: bool = False                # also keep an exponential moving average of the weights; each epoch keeps
                                     # the averaged or the trained weights, whichever validates better
                                     # (core/train/averaging.py)
    ema_half_life: float = 1.0       # epochs after which a step's weights count half in the average (timm's
                                     # ImageNet default is about 1.4)
    swa_epochs: int = 0              # stochastic weight averaging: the last N epochs train at a constant rate
                                     # (swa_lr) and the plain mean of their weights, with batch-norm statistics of
                                     # its own, is validated beside them like ema's (core/train/averaging.py; 0: off)
    swa_lr: float = 0.05             # the SWA epochs' learning rate, as a share of lr (Izmailov et al.'s VGG-16
                                     # recipe is 0.2; 0.05 lost less on ELPV and gained more on digits:
                                     # bench/RESULTS.md, "Stochastic weight averaging")
    schedule_start_epoch: int = 0    # the lr schedule's cycle runs over the epochs after this one (0: all). Set
                                     # when a finished run is extended, so the added epochs get a cycle of their own
    seed: int = 0
    # --- runtime ---
    device: str = "auto"             # auto: CUDA, else MPS, else CPU
    amp: str = "auto"                # auto: bf16/fp16 on CUDA; on a CPU bf16 where measured faster (core/models/device.py).
                                     # "bf16" forces it where supported, "off" is fp32
    channels_last: bool = True
    cuda_graphs: bool = True         # on one CUDA device the training forward/backward is replayed as a CUDA graph
                                     # per batch shape: a small model's step is bound by kernel launches there
                                     # (core/train/graphs.py; no effect on a CPU)
    num_threads: int = 0             # CPU threads for torch (0: all cores, shared out among processes)
    devices: int = 1                 # processes training together (one per GPU; on a CPU each gets a share of the
                                     # cores). Each batch of batch_size is split across them: batch size, learning
                                     # rate and schedule mean the same as on one device (core/train/distributed.py)
    batch_norm: str = "auto"         # with several devices: auto = sync on GPUs (SyncBatchNorm), local on CPUs;
                                     # local: each device's own share; frozen: running statistics not updated
    tta: bool = False                # test-time augmentation: evaluation and prediction average several views
    tta_views: str = "flips"         # flips: the image and its two flips; dihedral: its 8 flips and quarter turns
                                     # (square inputs); auto: flips, dihedral or none, whichever validates best
                                     # with the best checkpoint at the end of training (core/infer/classifier.py).
                                     # Neither beat flips on ELPV (bench/RESULTS.md): CLI and --set only
    notes: str = ""
    extra: dict = field(default_factory=dict)  # free-form metadata (preset name, ...)

    @property
    def batch_norm_frozen(self) -> bool:
        """Whether batch norm's running statistics stay as they are (a frozen backbone, or batch_norm=frozen):
        training leaves them alone, and so does weight averaging."""
        return self.freeze_backbone or self.batch_norm == "frozen"

    @property
    def kind(self) -> str:
        """TRAINING, CROSSVAL or LEARNING_CURVE."""
        return self.extra.get("kind", TRAINING)

    @property
    def input_hw(self) -> tuple[int, int]:
        if self.image_height > 0 and self.image_width > 0:
            return (self.image_height, self.image_width)
        return (self.image_size, self.image_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def validate(self) -> "TrainConfig":
        """Raise ConfigError naming the first bad field; return self when all is well."""
        self._check_data_and_images()
        self._check_optimization()
        self._check_devices_and_pretraining()
        return self

    def _check_data_and_images(self) -> None:
        need = _need
        need(bool(str(self.data).strip()), "data", "choose a dataset (folder, CSV, or elpv/elpv4)")
        need(self.arch in ARCHS, "arch", f"must be one of {', '.join(ARCHS)}")
        need(isinstance(self.epochs, int) and self.epochs >= 1, "epochs", "must be at least 1")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", "must be at least 1")
        need(self.lr > 0, "lr", "must be greater than 0")
        need(self.image_size >= 16 or (self.image_height >= 16 and self.image_width >= 16),
             "image_size", "must be at least 16 pixels")
        need(self.image_size <= 1024 and self.image_height <= 1024 and self.image_width <= 1024,
             "image_size", "must be at most 1024 pixels")
        need((self.image_height > 0) == (self.image_width > 0), "image_height",
             "set both image_height and image_width, or neither")
        need(0 <= self.val_fraction < 1, "val_fraction", "must be in [0, 1)")
        need(0 <= self.test_fraction < 1, "test_fraction", "must be in [0, 1)")
        need(self.val_fraction + self.test_fraction < 0.9, "test_fraction",
             "val and test together must leave at least 10% for training")
        need(self.normalization in NORMALIZATIONS, "normalization", f"must be one of {NORMALIZATIONS}")
        need(self.split_groups in SPLIT_GROUPS, "split_groups", f"must be one of {SPLIT_GROUPS}")
        need(0 <= self.duplicate_distance <= 64, "duplicate_distance", "must be a number of bits from 0 to 64")

    def _check_optimization(self) -> None:
        need = _need
        need(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {OPTIMIZERS}")
        need(self.schedule in SCHEDULES, "schedule", f"must be one of {SCHEDULES}")
        need(self.weight_decay >= 0, "weight_decay", "must be 0 or more")
        need(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        need(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
        need(0 <= self.rotation <= 180, "rotation", "must be between 0 and 180 degrees")
        need(0.05 <= self.crop_scale_min <= 1, "crop_scale_min", "must be between 0.05 and 1")
        need(0.25 <= self.progressive_start <= 1, "progressive_start", "must be between 0.25 and 1 (1: off)")
        need(0 <= self.color_jitter <= 1, "color_jitter", "must be between 0 and 1")
        need(0 <= self.mixup <= 10, "mixup", "must be between 0 (off) and 10")
        need(0 <= self.cutmix <= 10, "cutmix", "must be between 0 (off) and 10")
        need(self.early_stop_patience >= 0, "early_stop_patience", "must be 0 (off) or more")
        need(self.early_stop_metric in EARLY_STOP_METRICS, "early_stop_metric",
             f"must be one of {EARLY_STOP_METRICS}")
        need(0 < self.ema_half_life <= 100, "ema_half_life", "must be more than 0 and at most 100 epochs")
        need(isinstance(self.swa_epochs, int) and self.swa_epochs >= 0, "swa_epochs", "must be 0 (off) or more")
        need(0 < self.swa_lr <= 1, "swa_lr", "must be more than 0 and at most 1 (a share of lr)")
        need(not (self.ema and self.swa_epochs), "swa_epochs",
             "cannot be used with ema: a run keeps one average of its weights")
        need(self.step_size >= 1, "step_size", "must be at least 1")
        need(0 <= self.schedule_start_epoch < self.epochs, "schedule_start_epoch", "must be in [0, epochs)")

    def _check_devices_and_pretraining(self) -> None:
        need = _need
        need(self.amp in AMP_MODES, "amp", f"must be one of {AMP_MODES}")
        need(self.device in DEVICES, "device", f"must be one of {DEVICES}")
        need(isinstance(self.devices, int) and 1 <= self.devices <= 64, "devices", "must be between 1 and 64")
        need(self.batch_size >= self.devices, "batch_size",
             f"must be at least the number of devices ({self.devices}): each batch is split across them")
        need(self.tta_views in TTA_VIEWS, "tta_views", f"must be one of {', '.join(TTA_VIEWS)}")
        need(self.batch_norm in BATCH_NORMS, "batch_norm", f"must be one of {BATCH_NORMS}")
        need(bool(str(self.weights).strip()), "weights", "use imagenet, none, self-supervised, or a file path")
        need(isinstance(self.ssl_epochs, int) and 1 <= self.ssl_epochs <= 1000, "ssl_epochs",
             "must be between 1 and 1000")
        need(32 <= self.ssl_image_size <= 1024, "ssl_image_size", "must be between 32 and 1024 pixels")
        need(isinstance(self.ssl_batch_size, int) and self.ssl_batch_size >= 2, "ssl_batch_size",
             "must be at least 2 (each view needs others to be told apart from)")
        need(str(self.weights).strip().lower() != "self-supervised" or self.devices == 1, "weights",
             "self-supervised pretraining runs on one device: set devices to 1")


def _parse_value(field_type, text: str):
    t = str(field_type)
    if "bool" in t:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    if "int" in t:
        return int(text)
    if "float" in t:
        return float(text)
    return text


def parse_overrides(items: list[str]) -> dict:
    """FIELD=VALUE strings (the command line's --set) as typed config values; ConfigError names a bad one."""
    types = {f.name: f.type for f in fields(TrainConfig)}
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError("set", f"expected FIELD=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip().replace("-", "_")
        if k not in types or k == "extra":
            raise ConfigError(k, "no such config field")
        try:
            out[k] = _parse_value(types[k], v.strip())
        except ValueError as exc:
            raise ConfigError(k, str(exc)) from None
    return out


# Named recipes the studio offers; each is a set of overrides on TrainConfig. ("auto", the default, is chosen per
# dataset and machine by core/train/recipe.py, so it is not a fixed set.) "classic" is TrainConfig's own defaults: the
# seed notebooks' recipe.
PRESETS: dict[str, dict] = {
    "classic": {},
    "quick look (CPU)": {"image_size": 128, "epochs": 5, "batch_size": 64},
    # Small grayscale inspection sets (ELPV solar cells, X-ray, EL, weld radiographs) trained from scratch:
    # the part has no "up", so all 8 flips/90-degree turns are valid views of the same defect; mean/std of the
    # data (gray images are far from ImageNet's statistics). From scratch in a CPU budget, 192 px with label
    # smoothing, crop and brightness jitter under-fit (train accuracy ~80% after 30 min on ELPV), so the time
    # buys more epochs at 128 px and none of the three (ELPV validation part, 9 min: 81.4% against 78.9%;
    # bench/RESULTS.md). Class weights are off: on ELPV 4-class they trade accuracy for balanced recall (26% vs
    # 69% test accuracy).
    "small grayscale inspection": {
        "weights": "none", "image_size": 128, "epochs": 60, "batch_size": 32,
        "optimizer": "adamw", "lr": 2e-3, "weight_decay": 5e-4, "schedule": "onecycle",
        "hflip": True, "vflip": True, "rot90": True, "rotation": 0.0, "crop_scale_min": 1.0,
        "color_jitter": 0.0, "label_smoothing": 0.0, "class_weights": False, "normalization": "dataset",
        "tta": True,
    },
}


def preset_values(name: str) -> dict:
    """Every field of a named recipe: TrainConfig's defaults with the recipe's settings over them (the Train page
    starts from these; `core train --recipe NAME` puts the flags the user typed over them)."""
    if name not in PRESETS:
        raise ConfigError("recipe", f"unknown recipe {name!r}; choose auto or one of {', '.join(PRESETS)}")
    return {**TrainConfig().to_dict(), **PRESETS[name]}

