"""Training throughput: the seed notebooks' pipeline vs the engine, same model, images, split and epochs.

Reference (written the way the seed notebooks do it): torchvision ImageFolder, a PIL transforms.Compose
(Resize, RandomHorizontalFlip, ToTensor, Normalize), DataLoader(batch_size=32, shuffle=True) with its default
num_workers=0, fp32, every image decoded again every epoch, Adam lr 1e-3, cross-entropy.
Engine: core.train.fit with its defaults (decoded-image cache, batched tensor augmentation, bf16 autocast
where supported, channels_last).

Both train torchvision's resnet18 from scratch (no download here) at 224 px on the engine's split of the
data. Trainings alternate (reference, engine; then engine, reference on the next dataset).

    python bench/train_speed.py              # ELPV + a generated set of the same size, 2 epochs each
    python bench/train_speed.py --quick      # 1 epoch on 320 training images per dataset (< 3 min on 2 cores)

Prints one JSON document. Keys: reference_images_per_s, engine_images_per_s, speedup, reference_val_acc,
engine_val_acc, device, plus per-dataset details.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from _common import MemoryPeak, environment  # noqa: E402


def make_generated_set(root: Path, n: int, classes: int = 2, size: int = 300, seed: int = 0) -> Path:
    """n gray 300x300 PNGs (like ELPV cells): class 1 carries a dark crack-like line somewhere."""
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        c = i % classes
        base = rng.normal(150, 25, (size, size)).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(base, "L")
        if c:
            d = ImageDraw.Draw(img)
            x0, y0 = rng.integers(0, size, 2)
            d.line([(int(x0), int(y0)), (int(x0 + rng.integers(-120, 120)), int(y0 + rng.integers(-120, 120)))],
                   fill=40, width=4)
        img.save(root / f"class{c}" / f"{i:05d}.png")
    return root


def link_split_as_image_folders(split: dict, part: str, root: Path) -> Path:
    """ImageFolder layout of one split part, as symlinks to the original files."""
    out = root / part
    for k, (path, label, _group) in enumerate(split[part]):
        d = out / label
        d.mkdir(parents=True, exist_ok=True)
        os.symlink(path, d / f"{k:05d}{Path(path).suffix}")
    return out


def train_reference(split: dict, tmp: Path, epochs: int, batch_size: int, size: int, seed: int) -> dict:
    import torchvision
    from torchvision import transforms
    torch.manual_seed(seed)
    train_dir = link_split_as_image_folders(split, "train", tmp)
    val_dir = link_split_as_image_folders(split, "val", tmp)
    norm = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    train_tf = transforms.Compose([transforms.Resize((size, size)), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), norm])
    val_tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(), norm])
    train_ds = torchvision.datasets.ImageFolder(str(train_dir), transform=train_tf)
    val_ds = torchvision.datasets.ImageFolder(str(val_dir), transform=val_tf)
    train_dl = torch.utils.data.DataLoader(train_ds, batch_size=batch_size, shuffle=True)
    val_dl = torch.utils.data.DataLoader(val_ds, batch_size=batch_size)
    # The notebooks' one line of device handling: the model and each batch on CUDA when there is one.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = torchvision.models.resnet18(weights=None)
    model.fc = nn.Linear(model.fc.in_features, len(train_ds.classes))
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    epoch_s, train_s, seen = [], 0.0, 0
    val_acc = float("nan")
    for _ in range(epochs):
        t0 = time.perf_counter()
        model.train()
        for x, y in train_dl:
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            seen += len(y)
        t1 = time.perf_counter()
        train_s += t1 - t0
        val_acc = accuracy(model, val_dl)
        epoch_s.append(time.perf_counter() - t0)
    return {"images_per_s": seen / train_s, "seconds_per_epoch": float(np.mean(epoch_s)), "val_acc": val_acc}


def accuracy(model, loader) -> float:
    """Top-1 accuracy of a model over a DataLoader, in eval mode (the notebooks' validation loop)."""
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
            total += len(y)
    return correct / max(total, 1)


def train_engine(ws, data: str, split: dict, epochs: int, batch_size: int, size: int, seed: int) -> dict:
    from core.config import TrainConfig
    from core.data.cache import IMAGE_CACHE
    from core.train.loop import fit
    cfg = TrainConfig(data=data, weights="none", epochs=epochs, batch_size=batch_size, image_size=size, seed=seed)
    run = ws.create_run(cfg, Path(data).name)
    run.split_path.write_text(json.dumps(split))
    IMAGE_CACHE._mem.clear()  # count the decoding in the first epoch, like a fresh process
    t0 = time.perf_counter()
    result = fit(ws, run)
    total = time.perf_counter() - t0
    hist = result["history"]
    n_train = len(split["train"])
    train_s = sum(h["seconds"] for h in hist)  # per-epoch seconds (train + validation)
    pure_train = sum(n_train / h["images_per_s"] for h in hist)
    return {"images_per_s": n_train * len(hist) / pure_train, "seconds_per_epoch": train_s / len(hist),
            "seconds_total_with_decode_and_test": total, "val_acc": hist[-1]["val_acc"],
            "first_epoch_images_per_s": hist[0]["images_per_s"]}


def subset_split(split: dict, n_train: int, n_val: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    out = dict(split)
    for part, n in (("train", n_train), ("val", n_val)):
        rows = split[part]
        if n and n < len(rows):
            idx = sorted(rng.choice(len(rows), n, replace=False))
            out[part] = [rows[i] for i in idx]
    out["test"] = out["val"][:8]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 epoch on 320 training images per dataset")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--datasets", default="elpv,generated")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    epochs = args.epochs or (1 if args.quick else 2)
    n_train, n_val = (320, 96) if args.quick else (0, 0)

    from core.data.sources import load_dataset
    from core.data.split import split_to_json, stratified_split
    from core.models.device import autocast_dtype, describe_device, select_device
    from core.workspace.store import Workspace

    device = select_device("auto")
    from core.models.device import cpu_threads
    torch.set_num_threads(cpu_threads())
    results = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        ws = Workspace(tmp / "ws")
        for k, name in enumerate(args.datasets.split(",")):
            if name == "generated":
                source = str(make_generated_set(tmp / "generated", 2624))
            else:
                source = name
            ds = load_dataset(source)
            split = split_to_json(ds, stratified_split(ds, 0.15, 0.15, 42))
            split = subset_split(split, n_train, n_val, args.seed)
            order = ("reference", "engine") if k % 2 == 0 else ("engine", "reference")
            out = {}
            for which in order:
                with MemoryPeak("VmRSS") as rss:
                    if which == "reference":
                        out[which] = train_reference(split, tmp / f"ref-{name}", epochs, args.batch_size,
                                                     args.size, args.seed)
                    else:
                        out[which] = train_engine(ws, source, split, epochs, args.batch_size, args.size, args.seed)
                out[which]["peak_rss_mb"] = round(rss.peak / 2**20)
                print(f"[{name}] {which}: {json.dumps(out[which])}", file=sys.stderr)
            out["speedup"] = out["engine"]["images_per_s"] / out["reference"]["images_per_s"]
            out["train_images"] = len(split["train"])
            out["val_images"] = len(split["val"])
            results[name] = out

    ref_ips = float(np.mean([r["reference"]["images_per_s"] for r in results.values()]))
    eng_ips = float(np.mean([r["engine"]["images_per_s"] for r in results.values()]))
    first = next(iter(results.values()))
    doc = {
        "benchmark": "train_speed",
        "quick": args.quick,
        "epochs": epochs,
        "image_size": args.size,
        "batch_size": args.batch_size,
        "device": describe_device(device),
        "precision": str(autocast_dtype(device, "auto") or "fp32"),
        "reference_images_per_s": round(ref_ips, 2),
        "engine_images_per_s": round(eng_ips, 2),
        "speedup": round(eng_ips / ref_ips, 2),
        "reference_val_acc": round(first["reference"]["val_acc"], 4),
        "engine_val_acc": round(first["engine"]["val_acc"], 4),
        "datasets": results,
        **environment(),
    }
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
