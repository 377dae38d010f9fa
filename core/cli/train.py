"""`train`, `resume` and `job`: a run trained in this process, on one device or several."""
from __future__ import annotations

import argparse
import sys

from core.cli.output import USER_ERRORS, Output
from core.cli.progress import ProgressBar
from core.config import ARCHS, OPTIMIZERS, SCHEDULES, SPLIT_GROUPS, TrainConfig, parse_overrides, preset_values
from core.jobs.worker import launched_by_torchrun
from core.runs import life as runs
from core.workspace.store import Workspace

RESULT_KEYS = ("status", "error", "epochs_done", "best_val_acc", "test_acc")

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


def add_config_args(p: argparse.ArgumentParser) -> None:
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
    values = {**preset_values(args.recipe), "extra": {"preset": args.recipe}, "data": args.data}
    values.update(typed_values(args))
    return TrainConfig.from_dict(values)


def auto_from_args(ws: Workspace, args):
    """The auto recipe for --data on this machine, with what the user typed fixed (core/train/recipe.py)."""
    from core.train.recipe import auto_recipe
    return auto_recipe(ws, args.data, fixed=typed_values(args))


def run_here(ws: Workspace, run_id: str, resume: bool = False, bar: ProgressBar | None = None, echo=None) -> dict:
    """The one way a command runs a prepared run: the training process's own (core/jobs/worker.py's run_job: one
    device here, a launcher for several, or a rank under torchrun), reporting through `bar` when one is given.
    Returns the result with the keys every command prints."""
    from core.jobs.worker import run_job
    result = run_job(ws, run_id, resume, echo=echo, reporter=bar)
    row = ws.run_row(run_id) or {}  # a launcher's result has the status only: the rest is in the index
    return {k: result.get(k, row.get(k)) for k in RESULT_KEYS}


def train_in_foreground(ws: Workspace, run, bar: ProgressBar, resume: bool, extra: dict | None = None) -> Output | int:
    """The run's life in this process, the same as a studio job; prints the run id last. On several devices this
    process launches the ranks and waits; rank 0 prints its log lines here."""
    devices = run.config().devices
    try:
        result = run_here(ws, run.id, resume, bar=bar)
    except KeyboardInterrupt:
        print(f"stopped; continue with `python -m core resume {run.id}`. run id:", file=sys.stderr)
        print(run.id)
        return 130
    if devices > 1:
        extra = {"devices": devices, **(extra or {})}
    if result["status"] == "failed":
        print(f"error: {result['error']}", file=sys.stderr)
    skipped = run.skipped()
    if skipped and not bar.quiet:  # the whole list once more at the end, where a user reads it
        print(f"{len(skipped)} files were left out:", *(f"  {p}: {r}" for p, r in skipped), sep="\n", file=sys.stderr)
    doc = {"run_id": run.id, **result, "skipped": runs.skipped_files(skipped), **(extra or {})}
    return Output(doc, lambda: [run.id], 1 if result["status"] == "failed" else 0)


def cmd_train(args, ws: Workspace | None) -> Output | int:
    if launched_by_torchrun():
        return train_as_rank(args)
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
    return train_in_foreground(ws, run, bar, resume=False, extra={"recipe": recipe.summary()} if recipe else None)


def train_as_rank(args) -> Output | int:
    """`torchrun ... -m core train ...`: rank 0 prepares the run (the recipe, the split) and tells the others
    its id; then every rank trains its share (core/jobs/worker.py). The workspace and the images must be at the same
    paths on every machine (a shared file system)."""
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
    result = run_here(Workspace(args.workspace), answer["run"], echo=sys.stderr if ranks.main and not args.quiet else None)
    code = 1 if result["status"] == "failed" else 0
    if not ranks.main:
        return code
    return Output({"run_id": answer["run"], **result}, lambda: [answer["run"]], code)


def cmd_job(args, ws: Workspace) -> int:
    """Work a queued run: the studio's training process, a multi-device launcher, or one rank (core/jobs/worker.py)."""
    from core.jobs.worker import stop_with_parent
    if args.with_parent:
        stop_with_parent(ws.run(args.run))
    result = recorded(run_here)(ws, args.run, args.resume, echo=sys.stderr)
    return 1 if result["status"] == "failed" else 0


def recorded(fn):
    """Under torch.distributed.elastic, a rank's exception goes to the agent's error file, so that the launcher
    can say which rank failed and why."""
    if not launched_by_torchrun():
        return fn
    from torch.distributed.elastic.multiprocessing.errors import record
    return record(fn)


def cmd_resume(args, ws: Workspace) -> Output | int:
    runs.mark_interrupted(ws)
    run = runs.prepare_resume(ws, args.run, args.epochs)
    bar = ProgressBar(quiet=args.quiet)
    bar.log(run.log_path.read_text().splitlines()[-1].split(" ", 1)[-1])
    bar.run = run
    return train_in_foreground(ws, run, bar, resume=True)


def add_commands(add) -> None:
    p = add("train", cmd_train, "train a model in the foreground; prints the run id last",
            workspace=lambda args: not launched_by_torchrun())  # ranks open it once rank 0 has made it
    add_config_args(p)
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
