"""The headless interface: `python -m core train|evaluate|predict|runs|datasets`.

User mistakes (bad paths, bad options, unusable checkpoints) print one line on stderr and exit 2;
a failed training run exits 1. Tracebacks are only for bugs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .checkpoint import CheckpointError
from .config import ARCHS, OPTIMIZERS, SCHEDULES, ConfigError, TrainConfig, parse_overrides
from .data import DatasetError
from .model import WeightsError
from .storage import Workspace
from .train import Reporter, TrainingError, failure_message, fit, prepare_run

USER_ERRORS = (ConfigError, DatasetError, WeightsError, CheckpointError, KeyError, FileNotFoundError,
               TrainingError, OSError, ValueError)


class ProgressBar(Reporter):
    """A one-line progress bar on stderr; epoch summaries and log lines above it."""

    def __init__(self, stream=sys.stderr, quiet: bool = False):
        self.stream, self.quiet = stream, quiet
        self._last = 0.0
        self._tty = stream.isatty()

    def _line(self, text: str, final: bool = False) -> None:
        if self.quiet:
            return
        if self._tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        elif final:
            self.stream.write(text + "\n")
        self.stream.flush()

    def log(self, message: str) -> None:
        self._line(message, final=True)

    def stage(self, name: str, done: int = 0, total: int = 0) -> None:
        if total and time.monotonic() - self._last > 0.2:
            self._last = time.monotonic()
            self._line(f"{name}: {done}/{total}", final=done >= total and not self._tty)

    def batch(self, epoch: int, batch: int, batches: int, images_per_s: float) -> None:
        if time.monotonic() - self._last < 0.2 and batch < batches:
            return
        self._last = time.monotonic()
        width = 30
        filled = int(width * batch / max(batches, 1))
        self._line(f"epoch {epoch} [{'#' * filled}{'.' * (width - filled)}] {batch}/{batches} "
                   f"{images_per_s:.0f} img/s")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="folder of class sub-folders, a CSV of path,label, or elpv/elpv4")
    p.add_argument("--arch", choices=ARCHS, default="resnet18")
    p.add_argument("--weights", default="imagenet", help="imagenet | none | path to a state_dict file")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    p.add_argument("--schedule", choices=SCHEDULES, default="none")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--class-weights", action="store_true", help="weight the loss by inverse class frequency")
    p.add_argument("--freeze-backbone", action="store_true", help="train only the new final layer")
    p.add_argument("--early-stop", type=int, default=0, metavar="PATIENCE", help="epochs without improvement")
    p.add_argument("--normalization", choices=("imagenet", "dataset"), default="imagenet")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=42)
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto")
    p.add_argument("--preset", help="a named recipe to start from (see `python -m core presets`)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other config field, e.g. --set rotation=15 --set vflip=true")


def config_from_args(args) -> TrainConfig:
    from .config import PRESETS
    base: dict = {}
    if args.preset:
        if args.preset not in PRESETS:
            raise ConfigError("preset", f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
        base.update(PRESETS[args.preset])
    defaults = TrainConfig()
    explicit = {
        "data": args.data, "arch": args.arch, "weights": args.weights, "epochs": args.epochs,
        "batch_size": args.batch_size, "image_size": args.image_size, "lr": args.lr,
        "optimizer": args.optimizer, "schedule": args.schedule, "weight_decay": args.weight_decay,
        "dropout": args.dropout, "label_smoothing": args.label_smoothing, "class_weights": args.class_weights,
        "freeze_backbone": args.freeze_backbone, "early_stop_patience": args.early_stop,
        "normalization": args.normalization, "seed": args.seed, "split_seed": args.split_seed,
        "device": args.device, "amp": args.amp,
    }
    # A preset supplies values; flags the user typed (anything not at its default) win over it.
    for k, v in explicit.items():
        if k not in base or v != getattr(defaults, k):
            base[k] = v
    base.update(parse_overrides(args.set))
    if args.preset:
        base.setdefault("extra", {})["preset"] = args.preset
    return TrainConfig.from_dict(base)


def cmd_train(args) -> int:
    ws = Workspace(args.workspace)
    cfg = config_from_args(args)
    run = prepare_run(ws, cfg)
    bar = ProgressBar(quiet=args.quiet)
    bar.log(f"run {run.id}: {cfg.arch}, weights {cfg.weights}, {cfg.epochs} epochs, "
            f"image {cfg.input_hw[0]}x{cfg.input_hw[1]}, batch {cfg.batch_size}")
    for line in run.log_path.read_text().splitlines():
        bar.log(line.split(" ", 1)[-1])
    ws.update_run(run.id, status="running", started=time.time(), pid=os.getpid())
    try:
        result = fit(ws, run, reporter=bar)
    except KeyboardInterrupt:
        ws.update_run(run.id, status="stopped", finished=time.time())
        print("stopped; resume with the studio's Runs page. run id:", file=sys.stderr)
        print(run.id)
        return 130
    except Exception as exc:
        message = failure_message(exc)
        ws.update_run(run.id, status="failed", error=message, finished=time.time())
        print(f"error: {message}", file=sys.stderr)
        print(run.id)
        return 1
    ws.update_run(run.id, status=result["status"], finished=time.time())
    print(run.id)
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_run
    ws = Workspace(args.workspace)
    run = ws.run(args.run)
    if not run.best_path.exists():
        raise CheckpointError(f"run {args.run} has no best checkpoint (no epoch finished)")
    m = evaluate_run(ws, run)
    if args.json:
        print(json.dumps(m))
        return 0
    print(f"run {run.id}: {m['split']} split, {m['n']} images")
    print(f"accuracy {m['accuracy']:.4f}  loss {m['loss']:.4f}  macro F1 {m['macro_f1']:.4f}  "
          f"weighted F1 {m['weighted_f1']:.4f}")
    width = max(len(c) for c in m["classes"]) + 2
    print(f"{'class':<{width}} precision  recall     f1  support")
    for r in m["per_class"]:
        print(f"{r['class']:<{width}} {r['precision']:9.3f} {r['recall']:7.3f} {r['f1']:6.3f} {r['support']:8d}")
    print("confusion matrix (rows: true, columns: predicted):")
    for c, row in zip(m["classes"], m["confusion_matrix"]):
        print(f"  {c:<{width}} " + " ".join(f"{v:6d}" for v in row))
    return 0


def cmd_predict(args) -> int:
    from .predict import get_predictor
    ws = Workspace(args.workspace)
    predictor = get_predictor(ws, args.run)
    results = predictor.predict(list(args.images), top_k=args.top_k)
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "probs"} for r in results]))
    else:
        for r in results:
            if "error" in r:
                print(f"{r['path']}: error: {r['error']}")
            else:
                tops = ", ".join(f"{t['label']} {t['prob']:.3f}" for t in r["top"])
                print(f"{r['path']}: {tops}")
    return 1 if all("error" in r for r in results) else 0


def cmd_runs(args) -> int:
    ws = Workspace(args.workspace)
    ws.mark_interrupted()
    rows = ws.list_runs()
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print(f"no runs in {ws.root}")
        return 0
    print(f"{'run':<22} {'status':<12} {'dataset':<16} {'arch':<16} {'epochs':>7} {'best val':>9} {'test':>7}")
    for r in rows:
        fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else "-"
        print(f"{r['id']:<22} {r['status']:<12} {r['dataset'][:16]:<16} {r['arch']:<16} "
              f"{r['epochs_done']:>3}/{r['epochs']:<3} {fmt(r['best_val_acc']):>9} {fmt(r['test_acc']):>7}")
    return 0


def cmd_presets(args) -> int:
    from .config import PRESETS
    for name, over in PRESETS.items():
        print(f"{name}: {json.dumps(over) if over else '(the seed defaults)'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m core", description="Train and inspect image classifiers.")
    parser.add_argument("--workspace", default=None, help="workspace folder (default ./workspace or $STUDIO_WORKSPACE)")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, fn, help_):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--workspace", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        p.set_defaults(fn=fn)
        return p

    p = add("train", cmd_train, "train a model in the foreground; prints the run id last")
    _add_config_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p = add("evaluate", cmd_evaluate, "evaluate a run's best checkpoint on its test split")
    p.add_argument("run")
    p.add_argument("--json", action="store_true")
    p = add("predict", cmd_predict, "predict images with a run's best checkpoint")
    p.add_argument("run")
    p.add_argument("images", nargs="+")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p = add("runs", cmd_runs, "list runs")
    p.add_argument("--json", action="store_true")
    add("presets", cmd_presets, "list named training recipes")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except USER_ERRORS as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
