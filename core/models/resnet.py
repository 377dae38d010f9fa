"""Models: torchvision ResNets with a new head, the seed project's hand-built ResNet18, weights."""
from __future__ import annotations

import urllib.error
from pathlib import Path

import torch
import torch.nn as nn

from core.config import TrainConfig
from core.errors import UserError
from core.models.checkpoint import CheckpointError, load_checkpoint, nonfinite_tensors, safe_torch_load


class WeightsError(UserError):
    """Requested weights cannot be used; the message says how to proceed."""


# ----------------------------------------------------------------------------------------------------
# The seed project's hand-built ResNet18 (BasicBlock, [2, 2, 2, 2]). Module names follow torchvision,
# so ImageNet state_dicts load into it and Grad-CAM finds layer4 the same way.


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18Custom(nn.Module):
    def __init__(self, num_classes: int = 1000, layers=(2, 2, 2, 2)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.in_planes = 64
        self.layer1 = self._make_layer(64, layers[0], 1)
        self.layer2 = self._make_layer(128, layers[1], 2)
        self.layer3 = self._make_layer(256, layers[2], 2)
        self.layer4 = self._make_layer(512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes, blocks, stride):
        layers = [BasicBlock(self.in_planes, planes, stride)]
        self.in_planes = planes
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ----------------------------------------------------------------------------------------------------


def _torchvision_name(arch: str) -> str:
    return "resnet18" if arch == "resnet18-custom" else arch


def imagenet_weights_file(arch: str) -> Path:
    """Where torchvision's cache keeps this architecture's ImageNet file."""
    from torchvision.models import get_model_weights
    url = get_model_weights(_torchvision_name(arch)).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def load_imagenet_state_dict(arch: str) -> dict:
    """Through torchvision's weights API and its normal cache (downloads once when online)."""
    from torchvision.models import get_model_weights
    weights = get_model_weights(_torchvision_name(arch)).DEFAULT
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, RuntimeError) as exc:
        target = imagenet_weights_file(arch)
        raise WeightsError(
            f"ImageNet weights for {arch} could not be downloaded ({type(exc).__name__}: {exc}). "
            f"You seem to be offline. Either copy the file {target.name} (from {weights.url}) to "
            f"{target.parent}, or pass it as a local file (--weights /path/to/{target.name}), "
            "or train from scratch (--weights none)."
        ) from None


def read_state_dict_file(path: str | Path) -> dict:
    """A state_dict file (torchvision's, or one of our checkpoints), loaded safely."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found (use imagenet, none, or an existing .pth file)")
    try:
        obj = safe_torch_load(path)
    except CheckpointError as exc:
        raise WeightsError(f"weights file {path.name}: {exc}") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"weights file {path.name} does not hold a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def forward_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of a ResNet's final layer (its pooled backbone features), computed as its forward computes it, up to
    `fc`: `model.fc(forward_features(model, x))` is `model(x)`, op for op. From the call itself, so that threads
    sharing one model never see each other's features (a forward hook on the shared model would)."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    return torch.flatten(model.avgpool(x), 1)


def _make_head(in_features: int, num_classes: int, dropout: float) -> nn.Module:
    if dropout > 0:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))
    return nn.Linear(in_features, num_classes)


def _load_backbone(model: nn.Module, state: dict, arch: str, source: str):
    """Load every backbone tensor; the head only when its shape fits. Refuse files of another model."""
    own = model.state_dict()
    head_prefix = "fc."
    # A torchvision head (fc.weight) maps onto a dropout head (fc.1.weight) and back.
    remapped = {}
    for k, v in state.items():
        if k.startswith(head_prefix):
            tail = k.split(".")[-1]
            for cand in (f"fc.{tail}", f"fc.1.{tail}"):
                if cand in own:
                    remapped[cand] = v
        else:
            remapped[k] = v
    backbone_keys = [k for k in own if not k.startswith(head_prefix)]
    missing = [k for k in backbone_keys if k not in remapped]
    wrong = [k for k in backbone_keys if k in remapped and remapped[k].shape != own[k].shape]
    unexpected = [k for k in remapped if k not in own and not k.startswith(head_prefix)]
    if missing or wrong or unexpected:
        example = (missing or wrong or unexpected)[0]
        raise WeightsError(
            f"{source} does not match {arch}: {len(missing)} tensors missing, {len(wrong)} of another shape, "
            f"{len(unexpected)} unknown (first: {example}). Use weights made for {arch}.")
    to_load = {k: v for k, v in remapped.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(to_load, strict=False)


def check_weights_file(arch: str, path: str | Path) -> None:
    """WeightsError unless the file holds weights this arch's backbone loads: read (safely) and fitted onto a fresh
    model, as training will, so that a wrong file is a one-line refusal before any run exists."""
    _load_backbone(build_model(arch, 2), read_state_dict_file(path), arch, f"weights file {Path(path).name}")


def build_model(arch: str, num_classes: int, weights: str = "none", dropout: float = 0.0,
                freeze_backbone: bool = False) -> nn.Module:
    """A ResNet with a num_classes head. weights: "imagenet", "none", or a state_dict file path."""
    if arch == "resnet18-custom":
        model = ResNet18Custom(num_classes=1000)
    elif arch in ("resnet18", "resnet34", "resnet50"):
        import torchvision
        model = torchvision.models.get_model(arch, weights=None)
    else:
        raise WeightsError(f"unknown architecture {arch!r}")
    model.fc = _make_head(model.fc.in_features, num_classes, dropout)
    w = (weights or "none").strip()
    if w.lower() == "imagenet":
        _load_backbone(model, load_imagenet_state_dict(arch), arch, "ImageNet weights")
    elif w.lower() not in ("none", "scratch", ""):
        _load_backbone(model, read_state_dict_file(w), arch, f"weights file {Path(w).name}")
    if freeze_backbone:
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("fc.")
    return model


def gradcam_layer(model: nn.Module) -> nn.Module:
    """The layer Grad-CAM looks at: the last residual block (same for every architecture here)."""
    return model.layer4[-1]


def model_from_checkpoint(path: str | Path):
    """(model in eval mode on CPU, meta). Refuses a checkpoint that does not fit its own metadata."""
    state, meta, _ = load_checkpoint(path)
    cfg = TrainConfig.from_dict(meta["config"])
    model = build_model(cfg.arch, len(meta["classes"]), weights="none", dropout=cfg.dropout)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0][:200]
        raise CheckpointError(
            f"weights do not fit a {cfg.arch} with {len(meta['classes'])} classes: {first}") from None
    bad = nonfinite_tensors(state)
    if bad:
        raise CheckpointError(f"checkpoint holds NaN or infinite weights (first: {bad[0]})")
    model.eval()
    return model, meta


def with_weights_at_hand(values: dict) -> dict:
    """Config values whose ImageNet weights are not on disk, changed to train from scratch: an offline machine
    cannot download them (the Train page starts from these and says so; the command line keeps the choice and
    its error names the file to copy)."""
    if values.get("weights") == "imagenet" and not imagenet_weights_file(values.get("arch", "resnet18")).exists():
        return {**values, "weights": "none"}
    return values

