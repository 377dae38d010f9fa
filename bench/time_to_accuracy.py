"""Time to accuracy (DAWNBench-style, on our own data): how long from "Start" to a model as good as the classic
recipe's, for the classic pipeline and for the studio's "auto" recipe.

Data: ELPV 2-class with the paper's split (bench/elpv_accuracy.py's: 75/25 stratified by defect probability and
cell type, the 75% split again 85/15 into training and validation). Model selection uses the validation part
only; the test part is scored once, at the end, for both pipelines.

Classic pipeline, written as the seed notebooks do it: torchvision ImageFolder + PIL transforms every epoch +
DataLoader (num_workers=0), 224 px, fp32, ImageNet normalization, horizontal flips, Adam 1e-3, batch 32, 10 epochs,
cross-entropy, best-validation checkpoint, resnet18 from scratch (no ImageNet weights on this machine). Its target
is its own best validation accuracy; its time to the target is the wall time at the end of its best epoch.

Studio: `core.recipe.auto_recipe` picks the recipe for this dataset on this machine (its few timed steps are part
of the studio's time), then the engine trains it (`core.train.fit`) from a cold image cache. Its time to the
target is the wall time at the end of the first epoch whose validation accuracy reaches the classic's best; it
then trains on to its own end, and its test accuracy is that of its best-validation checkpoint.

    python bench/time_to_accuracy.py                       # full: both pipelines (about 35 minutes on 2 cores)
    python bench/time_to_accuracy.py --precision fp32      # the studio forced to fp32 (a CPU without bf16)
    python bench/time_to_accuracy.py --classic-from FILE   # reuse a classic result (a JSON this bench wrote)
    python bench/time_to_accuracy.py --quick               # a subset, about a minute, for checks
    python bench/time_to_accuracy.py --smoke               # smaller still: both pipelines run (the test suite runs it)

Prints one JSON document (keys: speedup_to_target, classic_minutes_to_target, studio_minutes_to_target,
classic_test_acc, studio_test_acc, precision, cpu, device, ...) and writes the curves (validation accuracy
against wall time) as bench/results/time_to_accuracy-*.html and .png.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from elpv_accuracy import paper_split  # noqa: E402
from train_speed import accuracy, link_split_as_image_folders  # noqa: E402

from _common import environment  # noqa: E402

CLASSIC = {"image_size": 224, "batch_size": 32, "lr": 1e-3, "epochs": 10}
# --quick checks that both pipelines run and the figures come out, in about a minute; its ratio is not a result
# (96 validation images: one image is a point). The studio gets the epoch count auto picks for the full ELPV
# training part, since on 256 images alone auto would pick its maximum (60) and the check would take longer.
QUICK = {"train": 256, "val": 96, "test": 96, "classic_epochs": 1, "studio_epochs": 13}
# --smoke: the least that runs both pipelines end to end and writes every figure (the test suite's check)
SMOKE = {"train": 16, "val": 8, "test": 8, "classic_epochs": 1, "studio_epochs": 2}


def subset(split: dict, n: dict, seed: int = 0) -> dict:
    """A class-stratified random subset of each part (for --quick)."""
    rng = random.Random(seed)
    out = dict(split)
    for part in ("train", "val", "test"):
        rows = list(split[part])
        rng.shuffle(rows)
        by_class: dict[str, list] = {}
        for r in rows:
            by_class.setdefault(r[1], []).append(r)
        keep = []
        for _, members in sorted(by_class.items()):
            keep += members[:max(1, round(n[part] * len(members) / len(rows)))]
        out[part] = keep
    return out


# ----------------------------------------------------------------------------------------------------
# The classic pipeline


def run_classic(split: dict, tmp: Path, epochs: int, seed: int) -> dict:
    import torchvision
    from torchvision import transforms
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    # The notebooks' one line of device handling: the model and each batch on CUDA when there is one.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size, bs = CLASSIC["image_size"], CLASSIC["batch_size"]
    norm = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    train_tf = transforms.Compose([transforms.Resize((size, size)), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), norm])
    eval_tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(), norm])
    folders = {part: link_split_as_image_folders(split, part, tmp) for part in ("train", "val", "test")}
    train_ds = torchvision.datasets.ImageFolder(str(folders["train"]), transform=train_tf)
    val_ds = torchvision.datasets.ImageFolder(str(folders["val"]), transform=eval_tf)
    train_dl = torch.utils.data.DataLoader(train_ds, batch_size=bs, shuffle=True)
    val_dl = torch.utils.data.DataLoader(val_ds, batch_size=bs)
    model = torchvision.models.resnet18(weights=None)
    model.fc = nn.Linear(model.fc.in_features, len(train_ds.classes))
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=CLASSIC["lr"])
    loss_fn = nn.CrossEntropyLoss()
    curve, best_acc, best_state, best_epoch = [], -1.0, None, 0
    for epoch in range(1, epochs + 1):
        model.train()
        for x, y in train_dl:
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        val_acc = accuracy(model, val_dl)
        if val_acc > best_acc:  # the notebooks' "save the best model"
            best_acc, best_state, best_epoch = val_acc, copy.deepcopy(model.state_dict()), epoch
        curve.append({"epoch": epoch, "minutes": (time.perf_counter() - t_start) / 60, "val_acc": val_acc})
        print(f"classic epoch {epoch}: val acc {val_acc:.4f} at {curve[-1]['minutes']:.2f} min", file=sys.stderr,
              flush=True)
    model.load_state_dict(best_state)
    test_ds = torchvision.datasets.ImageFolder(str(folders["test"]), transform=eval_tf)
    test_acc = accuracy(model, torch.utils.data.DataLoader(test_ds, batch_size=bs))
    return {"recipe": {**CLASSIC, "epochs": epochs, "optimizer": "adam", "precision": "fp32",
                       "normalization": "imagenet", "augmentation": "hflip", "loader": "ImageFolder + DataLoader"},
            "curve": curve, "best_val_acc": best_acc, "best_epoch": best_epoch,
            "minutes_to_target": curve[best_epoch - 1]["minutes"], "minutes_total": curve[-1]["minutes"],
            "test_acc": test_acc}


# ----------------------------------------------------------------------------------------------------
# The studio's auto recipe, through the engine


def run_studio(split: dict, tmp: Path, target: float, precision: str, overrides: list[str], seed: int) -> dict:
    from core.config import parse_overrides
    from core.data.cache import IMAGE_CACHE
    from core.runs.life import Reporter
    from core.train.loop import fit
    from core.train.recipe import auto_recipe
    from core.workspace.store import Workspace

    class Clock(Reporter):
        def __init__(self, t_start):
            self.t_start, self.curve = t_start, []

        def epoch_end(self, row):
            self.curve.append({"epoch": row["epoch"], "minutes": (time.perf_counter() - self.t_start) / 60,
                               "val_acc": row["val_acc"]})
            print(f"studio epoch {row['epoch']}: val acc {row['val_acc']:.4f} at {self.curve[-1]['minutes']:.2f} "
                  f"min", file=sys.stderr, flush=True)

    ws = Workspace(tmp / "ws")  # a fresh workspace: no decoded images cached on disk
    IMAGE_CACHE._mem.clear()    # nor in memory
    t_start = time.perf_counter()
    fixed = {"seed": seed, **({"amp": "off"} if precision == "fp32" else {}), **parse_overrides(overrides)}
    recipe = auto_recipe(ws, split["source"], split=split, fixed=fixed)
    cfg = recipe.config
    run = ws.create_run(cfg, split["dataset"])
    run.split_path.write_text(json.dumps(split))
    clock = Clock(t_start)
    print(f"studio recipe: {recipe.why}; estimate {recipe.estimate.seconds / 60:.1f} min", file=sys.stderr,
          flush=True)
    fit(ws, run, reporter=clock)
    minutes_total = (time.perf_counter() - t_start) / 60
    ev = run.evaluation()
    reached = next((p for p in clock.curve if p["val_acc"] >= target), None)
    return {"recipe": {k: v for k, v in cfg.to_dict().items() if k not in ("notes", "extra", "data")},
            "why": recipe.why, "estimate_minutes": recipe.estimate.seconds / 60, "precision": recipe.precision,
            "curve": clock.curve, "best_val_acc": max(p["val_acc"] for p in clock.curve),
            "minutes_to_target": reached["minutes"] if reached else None,
            "epoch_at_target": reached["epoch"] if reached else None,
            "minutes_total": minutes_total, "test_acc": ev["accuracy"], "test_macro_f1": ev["macro_f1"]}


def save_curves(doc: dict, stem: Path) -> list[str]:
    import plotly.graph_objects as go
    fig = go.Figure()
    for name in ("classic", "studio"):
        c = doc[name]["curve"]
        fig.add_trace(go.Scatter(x=[p["minutes"] for p in c], y=[p["val_acc"] for p in c], mode="lines+markers",
                                 name=f"{name} (test {doc[name]['test_acc']:.1%})"))
    fig.add_hline(y=doc["target_val_acc"], line_dash="dot", annotation_text="target: classic's best val acc")
    fig.update_layout(title=f"Time to accuracy, ELPV 2-class: {doc['speedup_to_target']}x ({doc['cpu']}, "
                            f"studio {doc['precision']})", xaxis_title="wall-clock minutes from Start",
                      yaxis_title="validation accuracy", template="plotly_white")
    out = [str(stem.with_suffix(".html"))]
    fig.write_html(out[0], include_plotlyjs="cdn")
    # The PNG with matplotlib (installed with grad-cam): plotly's own PNG export needs kaleido and a browser.
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig_m, ax = plt.subplots(figsize=(9, 5))
    for name in ("classic", "studio"):
        c = doc[name]["curve"]
        ax.plot([p["minutes"] for p in c], [p["val_acc"] for p in c], marker="o",
                label=f"{name} (test {doc[name]['test_acc']:.1%})")
    ax.axhline(doc["target_val_acc"], linestyle=":", color="gray", label="target: classic's best val acc")
    ax.set(xlabel="wall-clock minutes from Start", ylabel="validation accuracy",
           title=f"ELPV 2-class: {doc['speedup_to_target']}x to the target ({doc['precision']})")
    ax.legend()
    fig_m.tight_layout()
    fig_m.savefig(stem.with_suffix(".png"), dpi=100)
    plt.close(fig_m)
    out.append(str(stem.with_suffix(".png")))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"subset {QUICK}: under 5 minutes, for checks")
    ap.add_argument("--smoke", action="store_true", help=f"subset {SMOKE}: both pipelines run, nothing measured")
    ap.add_argument("--precision", choices=["auto", "fp32"], default="auto",
                    help="fp32: force the studio's recipe to fp32 (to measure a CPU without bf16 on one with it)")
    ap.add_argument("--classic-from", help="a JSON document this bench wrote: reuse its classic result")
    ap.add_argument("--only", choices=["classic", "studio", "both"], default="both")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a field of the studio's recipe (for trying levers)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the curves")
    args = ap.parse_args()

    from core.models.device import cpu_name, describe_device, select_device
    device = select_device("auto")
    from core.models.device import cpu_threads
    torch.set_num_threads(cpu_threads())
    if device.type == "cuda":  # CUDA's start (seconds) is paid once per process: by neither pipeline's clock
        torch.zeros(1, device=device)
        torch.cuda.synchronize()
    split = paper_split(False, 2019)
    small = SMOKE if args.smoke else QUICK if args.quick else None
    args.quick = args.quick or args.smoke  # the smoke run is a smaller quick run: named and filed as one
    if small:
        split = subset(split, small, args.seed)
    classic_epochs = small["classic_epochs"] if small else CLASSIC["epochs"]

    doc = {"benchmark": "time_to_accuracy", "quick": args.quick, "data": "ELPV 2-class, paper split",
           "split": {p: len(split[p]) for p in ("train", "val", "test")}, "cpu": cpu_name(),
           "cpu_flags": cpu_flags(), "device": describe_device(device), **environment()}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        if args.classic_from:
            doc["classic"] = json.loads(Path(args.classic_from).read_text())["classic"]
            doc["classic"]["from"] = args.classic_from
        elif args.only in ("classic", "both"):
            doc["classic"] = run_classic(split, tmp / "classic", classic_epochs, args.seed)
        if args.only == "classic":
            print(json.dumps(doc, indent=2))
            return
        target = doc["classic"]["best_val_acc"]
        doc["target_val_acc"] = target
        overrides = args.set + ([f"epochs={small['studio_epochs']}"] if small else [])
        doc["studio"] = run_studio(split, tmp, target, args.precision, overrides, args.seed)
    c, s = doc["classic"], doc["studio"]
    doc.update({
        "precision": s["precision"],
        "classic_minutes_to_target": round(c["minutes_to_target"], 3),
        "studio_minutes_to_target": round(s["minutes_to_target"], 3) if s["minutes_to_target"] else None,
        "speedup_to_target": (round(c["minutes_to_target"] / s["minutes_to_target"], 2)
                              if s["minutes_to_target"] else None),
        "classic_test_acc": round(c["test_acc"], 4),
        "studio_test_acc": round(s["test_acc"], 4),
        "studio_minutes_total": round(s["minutes_total"], 3),
    })
    stem = Path(args.out) / (f"time_to_accuracy{'-quick' if args.quick else ''}-{s['precision']}-"
                             f"{'cuda' if device.type == 'cuda' else 'cpu'}-{doc['date']}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    doc["curves"] = [os.path.relpath(f, ROOT) if Path(f).resolve().is_relative_to(ROOT) else f
                     for f in save_curves(doc, stem)]
    print(json.dumps(doc, indent=2))


def cpu_flags() -> str:
    """The CPU's precision support, as `lscpu` names it (avx2, avx512f, avx512_bf16, amx_bf16, ...)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
                                    if f in have) or "none of avx2/avx512/amx"
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
