"""The headless interface: `python -m core train|resume|evaluate|predict|export|serve|runs|presets`.

User mistakes (bad paths, bad options, unusable checkpoints) print one line on stderr and exit 2;
a failed training run exits 1. Tracebacks are only for bugs.

torch is imported by the commands that use it, not here: `predict --model FILE.onnx` runs where only
onnxruntime, numpy and Pillow are installed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from core.config import ARCHS, OPTIMIZERS, PRESETS, SCHEDULES, SPLIT_GROUPS, ConfigError, TrainConfig, parse_overrides
from core.data.duplicates import DEFAULT_HASH_DISTANCE
from core.errors import UserError
from core.explain.neighbours import DEFAULT_SIMILARITY
from core.jobs.worker import launched_by_torchrun, stop_requested
from core.runs import life as runs
from core.runs.life import Reporter
from core.workspace.store import Workspace

USER_ERRORS = (UserError, KeyError, FileNotFoundError, OSError, ValueError)
EXPORT_FORMATS = ("onnx", "torchscript")  # core/deploy/export.py's FORMATS, named here without importing torch


class ProgressBar(Reporter):
    """A one-line progress bar on stderr; epoch summaries and log lines above it, and in the run's log.txt
    (as a studio job writes it) when a run is given."""

    def __init__(self, stream=sys.stderr, quiet: bool = False, run=None):
        self.stream, self.quiet, self.run = stream, quiet, run
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
        if self.run is not None:
            self.run.log(message)

    def stage(self, name: str, done: int = 0, total: int = 0) -> None:
        if total and time.monotonic() - self._last > 0.2:
            self._last = time.monotonic()
            self._line(f"{name}: {done}/{total}", final=done >= total and not self._tty)

    def should_stop(self) -> bool:
        """The studio's Stop reaches a run started here too (core/jobs/worker.py's stop request)."""
        return self.run is not None and stop_requested(self.run)

    def batch(self, epoch: int, batch: int, batches: int, images_per_s: float) -> None:
        if time.monotonic() - self._last < 0.2 and batch < batches:
            return
        self._last = time.monotonic()
        width = 30
        filled = int(width * batch / max(batches, 1))
        self._line(f"epoch {epoch} [{'#' * filled}{'.' * (width - filled)}] {batch}/{batches} "
                   f"{images_per_s:.0f} img/s")


# Flags of `train`: (flag, config field, argparse options). No flag has a default of its own: a flag the user did
# not type is absent, so what they typed always wins over a preset, and the rest comes from the preset or from
# TrainConfig's defaults (core/config.py).
CONFIG_FLAGS = [
    ("--arch", "arch", dict(choices=ARCHS)),
    ("--weights", "weights", dict(help="imagenet | none | self-supervised (pretrain on the dataset's own images first, "
                                        "ssl_* fields) | path to a state_dict file (default imagenet)")),
    ("--epochs", "epochs", dict(type=int)),
    ("--batch-size", "batch_size", dict(type=int)),
    ("--image-size", "image_size", dict(type=int)),
    ("--lr", "lr", dict(type=float)),
    ("--optimizer", "optimizer", dict(choices=OPTIMIZERS)),
    ("--schedule", "schedule", dict(choices=SCHEDULES)),
    ("--weight-decay", "weight_decay", dict(type=float)),
    ("--dropout", "dropout", dict(type=float)),
    ("--label-smoothing", "label_smoothing", dict(type=float)),
    ("--class-weights", "class_weights", dict(action="store_const", const=True,
                                              help="weight the loss by inverse class frequency")),
    ("--ordinal", "ordinal", dict(action="store_const", const=True,
                                  help="the classes are ordered grades (in sorted name order): an ordinal loss term")),
    ("--freeze-backbone", "freeze_backbone", dict(action="store_const", const=True,
                                                  help="train only the new final layer")),
    ("--early-stop", "early_stop_patience", dict(type=int, metavar="PATIENCE", help="epochs without improvement")),
    ("--normalization", "normalization", dict(choices=("imagenet", "dataset"))),
    ("--seed", "seed", dict(type=int)),
    ("--split-seed", "split_seed", dict(type=int)),
    ("--split-groups", "split_groups", dict(choices=SPLIT_GROUPS,
                                            help="duplicates: near-duplicate images go to one part together (no "
                                                 "image is tested on its twin; see `core duplicates`); origin: the "
                                                 "images of one module/batch/day (a CSV's group column, or the "
                                                 "sub-folder inside each class folder) go to one part")),
    ("--device", "device", dict(choices=("auto", "cpu", "cuda", "mps"))),
    ("--amp", "amp", dict(choices=("auto", "bf16", "fp16", "off"))),
    ("--devices", "devices", dict(type=int, metavar="N",
                                  help="train on N devices at once, one process each (GPUs; on a CPU, N shares of its "
                                       "cores): each batch is split across them, so batch size and learning rate "
                                       "mean the same as on one device")),
]


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="folder of class sub-folders, a CSV of path,label, or elpv/elpv4")
    for flag, dest, options in CONFIG_FLAGS:
        p.add_argument(flag, dest=dest, default=None, **options)
    p.add_argument("--recipe", "--preset", dest="recipe", default="auto",
                   help="auto (default: chosen for this dataset on this machine, with a time estimate) or a named "
                        "recipe to start from (see `python -m core presets`), e.g. classic")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other config field, e.g. --set rotation=15 --set vflip=true")


def typed_values(args) -> dict:
    """The config fields the user typed (flags and --set); they win over any recipe."""
    values = {dest: getattr(args, dest) for _, dest, _ in CONFIG_FLAGS if getattr(args, dest) is not None}
    values.update(parse_overrides(args.set))
    return values


def config_from_args(args) -> TrainConfig:
    """For a named recipe: TrainConfig's defaults, then the recipe, then the flags the user typed, then --set.
    (The auto recipe needs the dataset and the machine: see `auto_from_args`.)"""
    if args.recipe not in PRESETS:
        raise ConfigError("recipe", f"unknown recipe {args.recipe!r}; choose auto or one of {', '.join(PRESETS)}")
    values: dict = {**PRESETS[args.recipe], "extra": {"preset": args.recipe}, "data": args.data}
    values.update(typed_values(args))
    return TrainConfig.from_dict(values)


def auto_from_args(ws: Workspace, args):
    """The auto recipe for --data on this machine, with what the user typed fixed (core/train/recipe.py)."""
    from core.train.recipe import auto_recipe
    return auto_recipe(ws, args.data, fixed=typed_values(args))


def _train_in_foreground(ws: Workspace, run, bar: "ProgressBar", resume: bool, as_json: bool,
                         extra: dict | None = None) -> int:
    """The run's life in this process (core/runs/life.py), the same as a studio job; prints the run id last. On several
    devices this process launches the ranks (core/jobs/worker.py) and waits; rank 0 prints its log lines here."""
    from core.jobs.worker import run_job
    from core.train.loop import fit
    devices = run.config().devices
    try:
        if devices > 1:
            run_job(ws, run.id, resume)
            row = ws.run_row(run.id)
            result = {k: row[k] for k in ("status", "error", "epochs_done", "best_val_acc", "test_acc")}
            extra = {"devices": devices, **(extra or {})}
        else:
            result = runs.execute(ws, run.id, lambda: fit(ws, run, reporter=bar, resume=resume), bar)
    except KeyboardInterrupt:
        print(f"stopped; continue with `python -m core resume {run.id}`. run id:", file=sys.stderr)
        print(run.id)
        return 130
    if result["status"] == "failed":
        print(f"error: {result['error']}", file=sys.stderr)
    skipped = run.skipped()
    if skipped and not bar.quiet:  # the whole list once more at the end, where a user reads it
        print(f"{len(skipped)} files were left out:", *(f"  {p}: {r}" for p, r in skipped), sep="\n", file=sys.stderr)
    if as_json:
        print(json.dumps({"run_id": run.id, "status": result["status"], "error": result.get("error"),
                          "epochs_done": result.get("epochs_done"), "best_val_acc": result.get("best_val_acc"),
                          "test_acc": result.get("test_acc"),
                          "skipped": runs.skipped_files(skipped), **(extra or {})}))
    else:
        print(run.id)
    return 1 if result["status"] == "failed" else 0


def cmd_train(args) -> int:
    if launched_by_torchrun():
        return _train_as_rank(args)
    ws = Workspace(args.workspace)
    recipe = None
    if args.recipe == "auto":
        recipe = auto_from_args(ws, args)
        cfg = recipe.config
    else:
        cfg = config_from_args(args)
    if args.estimate:
        from core.train.estimate import estimate_run
        estimate = recipe.estimate if recipe else estimate_run(ws, cfg.validate())
        print(estimate.text())
        if recipe:
            print(f"auto recipe: {recipe.why}")
        return 0
    run = runs.prepare_run(ws, cfg)
    bar = ProgressBar(quiet=args.quiet)
    if recipe:  # said once the config is known to be usable, before the first epoch
        bar.log(f"auto recipe: {recipe.why}")
        bar.log(f"estimate: {recipe.estimate.text()}")
    for line in [f"run {run.id}: {cfg.arch}, weights {cfg.weights}, {cfg.epochs} epochs, image "
                 f"{cfg.input_hw[0]}x{cfg.input_hw[1]}, batch {cfg.batch_size}"
                 + (f", {cfg.devices} devices" if cfg.devices > 1 else "")] + run.log_path.read_text().splitlines():
        bar.log(line.split(" ", 1)[-1] if line[:2].isdigit() else line)  # the log's lines without their time
    bar.run = run
    return _train_in_foreground(ws, run, bar, resume=False, as_json=args.json,
                                extra={"recipe": recipe.summary()} if recipe else None)


def _train_as_rank(args) -> int:
    """`torchrun ... -m core train ...`: rank 0 prepares the run (the recipe, the split) and tells the others
    its id; then every rank trains its share (core/jobs/worker.py). The workspace and the images must be at the same
    paths on every machine (a shared file system)."""
    from core.jobs.worker import run_job
    from core.train import distributed
    ranks = distributed.Ranks.from_env()
    distributed.start(ranks, args.device or "auto")
    answer = None
    if ranks.main:  # the others open the workspace once rank 0 has made it
        try:
            ws = Workspace(args.workspace)
            cfg = auto_from_args(ws, args).config if args.recipe == "auto" else config_from_args(args)
            cfg.devices = ranks.world
            answer = {"run": runs.prepare_run(ws, cfg).id}
        except USER_ERRORS as exc:
            answer = {"error": str(exc)}
    answer = distributed.broadcast_object(answer, ranks)
    if "error" in answer:
        distributed.stop()
        if ranks.main:
            print(f"error: {answer['error']}", file=sys.stderr)
        return 2
    ws = Workspace(args.workspace)
    result = run_job(ws, answer["run"], echo=sys.stderr if ranks.main and not args.quiet else None)
    if ranks.main:
        print(json.dumps({"run_id": answer["run"], **{k: result.get(k) for k in ("status", "error", "epochs_done",
                                                                                "best_val_acc", "test_acc")}})
              if args.json else answer["run"])
    return 1 if result.get("status") == "failed" else 0


def cmd_job(args) -> int:
    """Work a queued run: the studio's training process, a multi-device launcher, or one rank (core/jobs/worker.py)."""
    from core.jobs.worker import run_job, stop_with_parent
    ws = Workspace(args.workspace)
    if args.with_parent:
        stop_with_parent(ws.run(args.run))
    result = _recorded(run_job)(ws, args.run, args.resume, sys.stderr)
    return 1 if result.get("status") == "failed" else 0


def _recorded(fn):
    """Under torch.distributed.elastic, a rank's exception goes to the agent's error file, so that the launcher
    can say which rank failed and why."""
    if not launched_by_torchrun():
        return fn
    from torch.distributed.elastic.multiprocessing.errors import record
    return record(fn)


def cmd_resume(args) -> int:
    ws = Workspace(args.workspace)
    runs.mark_interrupted(ws)
    run = runs.prepare_resume(ws, args.run, args.epochs)
    bar = ProgressBar(quiet=args.quiet)
    bar.log(run.log_path.read_text().splitlines()[-1].split(" ", 1)[-1])
    bar.run = run
    return _train_in_foreground(ws, run, bar, resume=True, as_json=args.json)


def cmd_evaluate(args) -> int:
    from core.infer.evaluate import evaluate_run
    from core.models.checkpoint import CheckpointError
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
    print(f"calibration: temperature {m['temperature']:.3f} (fitted on validation), expected calibration error "
          f"{m['ece_before']:.4f} -> {m['ece_after']:.4f} on {m['split']}")
    return 0


def cmd_decide(args) -> int:
    from core.decide.stored import decide_run
    from core.infer.evaluate import write_decisions
    ws = Workspace(args.workspace)
    run = ws.run(args.run)
    try:
        cost = json.loads(args.cost_matrix) if args.cost_matrix else None
    except json.JSONDecodeError:
        raise ConfigError("cost_matrix", 'must be JSON rows, cost[true][decided], e.g. "[[0,1],[10,0]]"') from None
    r = decide_run(run, args.positive, args.cost_miss, args.cost_false_alarm, cost, args.target_accuracy,
                   args.review_budget)
    write_decisions(run)
    if args.json:
        print(json.dumps(r))
        return 0
    t, a = r["test"]["rule"], r["test"]["argmax"]
    part = r["part"]
    if r["threshold"] is not None:
        print(f"threshold: {args.positive} when p({args.positive}) >= {r['threshold']:.4f} (chosen on validation)")
    print(f"{part} cost: {r['test_cost']:g} with the rule, {r['test_cost_argmax']:g} with argmax "
          f"({r['test']['n']} images)")
    if r["test"]["n"]:
        print(f"{part} accuracy {t['accuracy']:.4f}, precision {t['precision']:.4f}, recall {t['recall']:.4f} "
              f"(argmax: {a['accuracy']:.4f}, {a['precision']:.4f}, {a['recall']:.4f})")
    band = r["band"]
    if band is None:
        print("review band: " + ("none asked" if r["band_reachable"] else
                                 "the target accuracy is not reached on validation at any coverage"))
    elif band["none_needed"]:
        print(f"review band: none needed, every validation image stays automatic; on {part}: accuracy "
              f"{r['band_accuracy']:.4f}")
    else:
        what = (f"p({args.positive}) in [{band['p_low']:.4f}, {band['p_high']:.4f})" if "p_low" in band
                else f"confidence < {band['min_confidence']:.4f}")
        print(f"review band: {what} goes to a person; on {part}: coverage {r['coverage']:.1%}, accuracy of the "
              f"automatic decisions {r['band_accuracy']:.4f}" if r["band_accuracy"] is not None else
              f"review band: {what}; on {part} every image goes to a person")
    print(f"saved with run {run.id}: Predict, `core predict`, exports and the predictions CSV now decide with it")
    return 0


def cmd_learning_curve(args) -> int:
    from core.studies.learning_curve import as_learning_curve, learning_curve, read_learning_curve
    ws = Workspace(args.workspace)
    cfg = as_learning_curve(ws.run(args.run).config(), args.run, epochs=args.epochs)
    run = runs.prepare_derived(ws, args.run, cfg)
    bar = ProgressBar(quiet=args.quiet, run=run)
    try:
        result = runs.execute(ws, run.id, lambda: learning_curve(ws, run, bar), bar)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 130
    if result["status"] == "failed":
        print(f"error: {result['error']}", file=sys.stderr)
        return 1
    lc = read_learning_curve(run) or {}
    if args.json:
        print(json.dumps({"run_id": run.id, "status": result["status"], **lc}))
    else:
        print(*lc.get("advice", ["stopped before the last fraction: no curve"]), sep="\n")
        print(run.id)
    return 0


def _workspace_with_run(args) -> Workspace:
    """The workspace, after checking that it holds run `args.run` (a one-line error if not)."""
    ws = Workspace(args.workspace)
    if ws.run_row(args.run) is None:
        raise KeyError(f"no run {args.run!r} in {ws.root}")
    return ws


def cmd_cam_audit(args) -> int:
    from core.explain.cam_audit import Region, box_from, run_cam_audit, save_region, saved_region
    ws = _workspace_with_run(args)
    run = ws.run(args.run)
    source = run.config().data
    region = Region(None) if args.auto else Region(box_from(args.region)) if args.region else None
    if args.save_region and region is not None:
        save_region(ws, source, region)
    progress = None if (args.quiet or args.json) else (
        lambda done, total: print(f"\rGrad-CAM {done}/{total}", end="", file=sys.stderr, flush=True))
    result = run_cam_audit(ws, run, region or saved_region(ws, source), progress=progress)
    if progress:
        print(file=sys.stderr)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "images" or args.all}))
        return 0
    print(f"run {result['run_id']}: Grad-CAM of {result['n']} {result['part']} images against {result['region_text']}")
    for c in result["per_class"]:
        if c["images"]:
            print(f"  {c['class']}: {c['mean_outside']:.0%} of the attention outside on average; "
                  f"{c['mostly_outside']} of {c['images']} images mostly outside")
    for item in result["flagged"][:args.top]:
        print(f"- {item['outside']:.0%} outside: {item['path']} ({item['label']}, predicted {item['predicted']})")
    return 0


def cmd_audit_pack(args) -> int:
    from core.deploy.audit_pack import build_audit_pack
    ws = _workspace_with_run(args)
    out = build_audit_pack(ws, args.run, args.out)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{out['html']}\n{out['zip']} ({len(out['files'])} files)")
    return 0


def cmd_duplicates(args) -> int:
    from core.explain.leakage import run_duplicates
    ws = _workspace_with_run(args)
    by = tuple(args.by.split(","))
    report = run_duplicates(ws, ws.run(args.run), by, args.hash_distance, args.similarity)
    if args.json:
        print(json.dumps(report))
        return 0
    spans = ", ".join(f"{n} {k}" for k, n in sorted(report["straddling_by_parts"].items())) or "none"
    print(f"run {report['run_id']}: {report['n_groups']} near-duplicate groups ({report['n_images_in_groups']} of "
          f"{report['n_images']} images) by {' and '.join(report['by'])}; {report['n_straddling']} straddle two "
          f"parts of the split ({spans}); {report['n_labels_disagree']} disagree on the label")
    for g in report["groups"]:
        if g["straddles"] or g["labels_disagree"] or args.all:
            flags = [w for w, on in (("LEAKS", g["straddles"]), ("LABELS DISAGREE", g["labels_disagree"])) if on]
            print(f"- {' '.join(flags) or 'group'}: " + "; ".join(
                f"{m['path']} ({m['label']}, {m['part']})" for m in g["members"]))
    if report["n_straddling"]:
        print("to split keeping groups together, train with --split-groups duplicates")
    return 0


def cmd_predict(args) -> int:
    if args.model:  # an exported ONNX file: no torch, no workspace
        from core.deploy.portable import OnnxPredictor
        predictor, images = OnnxPredictor(args.model), args.items
    else:
        from core.deploy.predict import get_predictor
        if len(args.items) < 2:
            raise ConfigError("images", "give a run id and at least one image (or --model FILE.onnx and images)")
        predictor, images = get_predictor(Workspace(args.workspace), args.items[0]), args.items[1:]
    results = predictor.predict(list(images), top_k=args.top_k)
    if args.json:
        print(json.dumps(results))
    else:
        for r in results:
            if "error" in r:
                print(f"{r['path']}: error: {r['error']}")
            else:
                tops = ", ".join(f"{t['label']} {t['prob']:.3f}" for t in r["top"])
                verdict = f"{r['decision']['verdict']}  " if "decision" in r else ""
                print(f"{r['path']}: {verdict}{tops}")
    return 1 if all("error" in r for r in results) else 0


def cmd_export(args) -> int:
    from core.deploy.export import export_run
    ws = Workspace(args.workspace)
    out = export_run(ws, args.run, args.format, args.out, tta=args.tta)
    if args.json:
        print(json.dumps({"path": out["path"], "card_path": out["card_path"], "card": out["card"]}))
    else:
        card = out["card"]
        print(f"{out['path']}: {args.format}, classes {', '.join(card['classes'])}, input uint8 "
              f"{card['input']['height']}x{card['input']['width']}x3 RGB, TTA {card['tta']}", file=sys.stderr)
        print(out["path"])
    return 0


def cmd_serve(args) -> int:
    from core.deploy.serve import serve
    print(f"serving {args.model} on http://{args.host}:{args.port} (docs at /docs); Ctrl+C stops", file=sys.stderr)
    serve(args.model, Workspace(args.workspace), args.host, args.port, args.max_mb, args.max_files)
    return 0


def cmd_runs(args) -> int:
    ws = Workspace(args.workspace)
    runs.mark_interrupted(ws)
    rows = ws.list_runs()
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print(f"no runs in {ws.root}")
        return 0
    print(f"{'run':<22} {'status':<12} {'dataset':<16} {'arch':<16} {'epochs':>7} {'best val':>9} {'test':>7}")

    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else "-"

    for r in rows:
        print(f"{r['id']:<22} {r['status']:<12} {r['dataset'][:16]:<16} {r['arch']:<16} "
              f"{r['epochs_done']:>3}/{r['epochs']:<3} {fmt(r['best_val_acc']):>9} {fmt(r['test_acc']):>7}")
    return 0


def cmd_presets(args) -> int:
    print("auto: chosen for the dataset on this machine (image size, epochs, batch, schedule, precision); "
          "the default")
    for name, over in PRESETS.items():
        print(f"{name}: {json.dumps(over) if over else '(the seed notebooks: Adam 1e-3, 10 epochs, batch 32, 224 px)'}")
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
    p.add_argument("--json", action="store_true", help="print the result (run id, status, scores, skipped files) as JSON")
    p.add_argument("--estimate", action="store_true",
                   help="print how long this run would take on this machine (a few timed steps) and train nothing")
    p = add("resume", cmd_resume, "continue a stopped or interrupted run, or train a finished one on; prints the run id last")
    p.add_argument("run")
    p.add_argument("--epochs", type=int, help="train up to this epoch (a finished run gets a new learning-rate cycle "
                                              "over the added epochs, from its last epoch's weights)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p = add("job", cmd_job, "train a prepared (queued) run in this process: what the studio starts for each job, "
                            "and what each rank of a multi-device run runs")
    p.add_argument("run")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--with-parent", action="store_true",
                   help="stop the run (as Stop does) when the process that started this one ends (the studio)")
    p = add("evaluate", cmd_evaluate, "evaluate a run's best checkpoint on its test split")
    p.add_argument("run")
    p.add_argument("--json", action="store_true")
    p = add("decide", cmd_decide, "choose and save a decision rule for a run: a cost-minimizing threshold and a "
                                   "review band, chosen on validation and scored on test")
    p.add_argument("run")
    p.add_argument("--positive", help="the class a miss of which costs --cost-miss (two-class runs: the 'fail' class)")
    p.add_argument("--cost-miss", type=float, default=1.0, help="cost of calling a positive image negative")
    p.add_argument("--cost-false-alarm", type=float, default=1.0, help="cost of calling a negative image positive")
    p.add_argument("--cost-matrix", help="several classes: JSON list of rows, cost[true][decided] (overrides the two costs)")
    band = p.add_mutually_exclusive_group()
    band.add_argument("--target-accuracy", type=float,
                      help="send the least certain images to a person until the rest reach this accuracy (0-1)")
    band.add_argument("--review-budget", type=float, help="the largest share of images a person reviews (0-1)")
    p.add_argument("--json", action="store_true")
    p = add("learning-curve", cmd_learning_curve, "train a run's recipe on 25/50/75/100%% of its training images "
                                                  "and say how many more images each class needs")
    p.add_argument("run")
    p.add_argument("--epochs", type=int, help="epochs per fraction (default: the run's); fewer keeps it short")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true")
    p = add("cam-audit", cmd_cam_audit, "Grad-CAM of a run's whole test part: the share of attention outside the "
                                          "region where the evidence should be, per class, and the images where "
                                          "the model looked mostly elsewhere")
    p.add_argument("run")
    p.add_argument("--region", help="x0,y0,x1,y1 in fractions of the image (default: the dataset's saved region, "
                                    "else each image's foreground)")
    p.add_argument("--auto", action="store_true", help="each image's foreground, found automatically")
    p.add_argument("--save-region", action="store_true", help="keep --region / --auto for this dataset")
    p.add_argument("--top", type=int, default=20, help="images listed (default 20)")
    p.add_argument("--all", action="store_true", help="with --json: every image's share, not only the flagged")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true")
    p = add("audit-pack", cmd_audit_pack, "one self-contained HTML report of a run and a zip of the files it cites "
                                            "(config, data hash and split, metrics, evaluation, calibration, rule, "
                                            "leakage, Grad-CAM audit, heatmaps, environment)")
    p.add_argument("run")
    p.add_argument("--out", help="folder for the two files (default: the run's folder)")
    p.add_argument("--json", action="store_true")
    p = add("duplicates", cmd_duplicates, "near-duplicate images of a run (by perceptual hash, and by the model's "
                                           "features) and the groups that straddle its train/val/test split")
    p.add_argument("run")
    p.add_argument("--by", default="hash", help="hash, features, or hash,features (features need the run's checkpoint)")
    p.add_argument("--hash-distance", type=int, default=DEFAULT_HASH_DISTANCE,
                   help=f"most differing bits of 64 for a near-duplicate (default {DEFAULT_HASH_DISTANCE})")
    p.add_argument("--similarity", type=float, default=DEFAULT_SIMILARITY,
                   help=f"least cosine similarity of features for a near-duplicate (default {DEFAULT_SIMILARITY})")
    p.add_argument("--all", action="store_true", help="list every group, not only those that leak or disagree")
    p.add_argument("--json", action="store_true")
    p = add("predict", cmd_predict, "predict images with a run's best checkpoint (RUN_ID IMAGE...) or an exported "
                                     "ONNX file (--model FILE IMAGE...)")
    p.add_argument("items", nargs="+", metavar="RUN_ID|IMAGE", help="a run id then images; with --model, images only")
    p.add_argument("--model", help="an ONNX file from `core export`: predicts without torch")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p = add("export", cmd_export, "write a run's model as ONNX or TorchScript with its model card; prints the path")
    p.add_argument("run")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="onnx")
    p.add_argument("--out", help="the file to write (default: the run's exports/ folder)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="put the run's test-time augmentation (its flips or 8 views) in the graph, or leave it out "
                        "(default: as the run was evaluated)")
    p.add_argument("--json", action="store_true")
    p = add("serve", cmd_serve, "serve a run's model (or an exported .onnx file) as an HTTP JSON API")
    p.add_argument("model", metavar="RUN_ID|FILE.onnx")
    p.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (this machine only) unless you mean otherwise")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-mb", type=float, default=20, help="largest image file accepted, in MB")
    p.add_argument("--max-files", type=int, default=32, help="most images in one request")
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
