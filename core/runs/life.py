"""A run's life, in one place: creating it, its status, its scores in the index, resuming and extending it.

    queued -> running -> done | stopped | failed (with the reason)
                 \\-> stopping -> stopped
    any active status whose process is gone -> interrupted (found at the next start)
    done | stopped | failed | interrupted -> queued (resume or extend)

The job manager, the CLI, training and evaluation call these functions; nothing else writes a run's row in the
index. No torch here: the studio imports this at start-up.
"""
from __future__ import annotations

import json
import os
import signal
import time
import traceback
from pathlib import Path

from core.config import TRAINING, ConfigError, TrainConfig
from core.errors import UserError
from core.workspace.store import ACTIVE, Run, Workspace, is_this_process, pid_alive, process_started

TRANSITIONS = {
    "queued": ("running", "stopped", "failed", "interrupted"),  # stopped: asked to stop before it started;
                                                                # failed: its process died before it started
    "running": ("stopping", "done", "stopped", "failed", "interrupted"),
    "stopping": ("stopped", "done", "failed", "interrupted"),
    "done": ("queued",),
    "stopped": ("queued",),
    "failed": ("queued",),
    "interrupted": ("queued",),
}
SCORES = ("epochs_done", "best_val_acc", "test_acc", "label_version", "golden_acc", "golden_version")


class TrainingError(UserError):
    """Training cannot go on; the message is for the user."""


class RunStateError(UserError, RuntimeError):
    """The run cannot do that in its present state; the message says why."""


def failure_message(exc: BaseException) -> str:
    """What a failed run records: a TrainingError's own words, anything else named by its type."""
    return str(exc) if isinstance(exc, TrainingError) else f"{type(exc).__name__}: {exc}"


def exit_reason(code: int | None, error: str = "") -> str:
    """Words for a training process's end: its exception, or the signal that killed it."""
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        why = f"was killed by signal {-code} ({name})"
        if -code == signal.SIGKILL:
            why += ("; the operating system's out-of-memory killer does this when memory runs out: lower "
                    "batch_size or image_size, or train on fewer devices")
        return why
    if error:
        return f"failed: {error}"
    return "ended; its exit status is unknown" if code is None else f"exited with code {code}"


class Reporter:
    """What training tells the outside world. The default does nothing; subclasses override."""

    def log(self, message: str) -> None: ...
    def stage(self, name: str, done: int = 0, total: int = 0) -> None: ...
    def batch(self, epoch: int, batch: int, batches: int, images_per_s: float) -> None: ...
    def epoch_end(self, row: dict) -> None: ...
    def should_stop(self) -> bool: return False


class SubReporter:
    """One of several trainings inside a job (a fold, a fraction of the data): passes its progress to the job's
    reporter with its name on log lines and stages, its epochs after those of the trainings before it, and `tag`
    added to each epoch's row."""

    def __init__(self, parent: Reporter, name: str, index: int, epochs: int, tag: dict | None = None):
        self.parent, self.name, self.offset, self.tag = parent, name, index * epochs, tag or {}

    def log(self, message):
        self.parent.log(f"[{self.name}] {message}")

    def stage(self, name, done=0, total=0):
        self.parent.stage(f"{self.name}: {name}", done, total)

    def batch(self, epoch, batch, batches, images_per_s):
        self.parent.batch(self.offset + epoch, batch, batches, images_per_s)

    def epoch_end(self, row):
        self.parent.epoch_end({**row, "epoch": self.offset + row["epoch"], **self.tag})

    def should_stop(self):
        return self.parent.should_stop()


# ----------------------------------------------------------------------------------------------------
# Creating a run


def prepare_run(ws: Workspace, cfg: TrainConfig, run_id: str | None = None,
                label_version: int | None = None) -> Run:
    """Validate, load the dataset with its effective labels, split it, and create the run (queued). Raises
    ConfigError or DatasetError before anything is written, so a bad config never becomes a failed run."""
    from core.data.labels import LabelStore
    from core.data.sources import load_dataset
    from core.data.split import origin_groups, split_to_json, stratified_split
    cfg.validate()
    w = str(cfg.weights).strip()
    if w.lower() not in ("imagenet", "none", "scratch", "self-supervised"):
        if not Path(w).expanduser().is_file():
            raise ConfigError("weights", f"file {w} not found (use imagenet, none, self-supervised, or a .pth file)")
        from core.models.resnet import WeightsError, check_weights_file
        try:  # read now, not after the run exists and the dataset is decoded
            check_weights_file(cfg.arch, Path(w).expanduser())
        except WeightsError as exc:
            raise ConfigError("weights", str(exc)) from None
    from core.data.golden import GoldenStore
    store, golden = LabelStore(ws), GoldenStore(ws)
    ds = store.apply(load_dataset(cfg.data))  # the effective labels: folder labels overridden by the store
    ds, held_out = golden.split_off(ds)  # the golden set never enters training, validation or model selection
    if label_version is None:
        label_version = store.version(ds.source)
    together = None
    if cfg.split_groups == "duplicates":
        from core.data.duplicates import dataset_duplicate_groups
        together = dataset_duplicate_groups(ds, cfg.duplicate_distance, ws.cache_dir)
    elif cfg.split_groups == "origin":
        together = origin_groups(ds)
        if not any(s.origin for s in ds.samples):
            raise ConfigError("split_groups", "the dataset names no origins: add a group column to its CSV "
                                              "(path,label,group), or put each class's images in sub-folders per "
                                              "module, batch or day")
    split = stratified_split(ds, cfg.val_fraction, cfg.test_fraction, cfg.split_seed, together)
    if cfg.batch_size > len(split["train"]):
        raise ConfigError("batch_size", f"batch size {cfg.batch_size} is larger than the training split "
                                        f"({len(split['train'])} images): lower it")
    split_json = split_to_json(ds, split, together)
    split_json["golden_version"] = golden.version(ds.source)
    if w.lower() == "self-supervised" and ds.unlabeled:  # pretraining looks at them too (core/train/pretrain.py)
        split_json["unlabeled"] = list(ds.unlabeled)
    run = ws.create_run(cfg, ds.name, run_id)
    run.split_path.write_text(json.dumps(split_json))
    run.write_skipped(ds.skipped)
    record(ws, run.id, label_version=label_version)
    counts = {p: len(v) for p, v in split.items()}
    run.log(f"dataset {ds.name}: {len(ds.samples)} images, {len(ds.classes)} classes, split {counts}, "
            f"{len(ds.skipped)} files skipped")
    if held_out:
        run.log(f"{held_out} image(s) of the golden set held out of the split (golden version "
                f"{split_json['golden_version']})")
    if together is not None:
        kind = "near-duplicate groups" if cfg.split_groups == "duplicates" else "origins"
        run.log(f"split keeping {len(together)} {kind} ({sum(map(len, together))} images) together")
    for path, reason in ds.skipped:
        run.log(f"skipped {path}: {reason}")
    return run


def prepare_derived(ws: Workspace, parent_id: str, cfg: TrainConfig) -> Run:
    """A new run (queued) over exactly the images and split of run `parent_id`: for jobs that study a run (its
    learning curve), so that they compare like with like even after labels changed."""
    cfg.validate()
    parent = ws.run(parent_id)
    row = ws.run_row(parent_id)
    if row is None or not parent.split_path.exists():
        raise KeyError(f"no run {parent_id!r} with a split in {ws.root}")
    run = ws.create_run(cfg, row["dataset"])
    run.split_path.write_text(parent.split_path.read_text())
    run.write_skipped(parent.skipped())
    record(ws, run.id, label_version=row.get("label_version"))
    run.log(f"over the split of run {parent_id}")
    return run


# ----------------------------------------------------------------------------------------------------
# Status and scores


def status(ws: Workspace, run_id: str) -> str:
    row = ws.run_row(run_id)
    if row is None:
        raise KeyError(f"no run {run_id!r} in {ws.root}")
    return row["status"]


def transition(ws: Workspace, run_id: str, new: str, error: str | None = None) -> None:
    """Move a run to a new status, refusing moves the life above does not have, and stamp the times. The write
    is a compare-and-set on the old status, so a stop request racing the end of a run cannot undo the end."""
    for _ in range(5):
        old = status(ws, run_id)
        if new not in TRANSITIONS.get(old, ()):
            raise RunStateError(f"run {run_id} is {old}; it cannot become {new}")
        fields: dict = {"status": new}
        if new == "running":
            fields.update(started=time.time(), finished=None, pid=os.getpid(), pid_started=process_started(),
                          error=None)
        elif new == "queued":  # the pid of the process that will run it: a queue whose process died is interrupted
            fields.update(finished=None, error=None, pid=os.getpid(), pid_started=process_started())
        elif new != "stopping":
            fields.update(finished=time.time(), error=error)
        if ws.update_run(run_id, expect_status=old, **fields):
            return
    raise RunStateError(f"run {run_id} changed status while it was being set to {new}")


def record(ws: Workspace, run_id: str, **scores) -> None:
    """Scores of a run as they come: epochs done, best validation accuracy, test accuracy, label version."""
    bad = set(scores) - set(SCORES)
    if bad:
        raise ValueError(f"not a run score: {', '.join(sorted(bad))}")
    ws.update_run(run_id, **scores)


def mark_interrupted(ws: Workspace) -> list[str]:
    """Runs left active by a process that is gone (killed, crashed) become `interrupted`. Returns their ids."""
    changed = []
    for row in ws.list_runs():
        if (row["status"] in ACTIVE and not is_this_process(row["pid"], row["pid_started"])
                and not pid_alive(row["pid"], row["pid_started"])):
            transition(ws, row["id"], "interrupted")
            changed.append(row["id"])
    return changed


def execute(ws: Workspace, run_id: str, work, reporter: Reporter, record_failure: bool = True) -> dict:
    """Run `work()` (training, cross-validation) as the run's life: running, then the status it returns, or
    failed with the reason. Returns work's result, or {"status": "failed", "error": message}.
    `record_failure=False`: an exception is logged and raised, for a caller that knows more about it (the
    launcher of a multi-device run, which learns which rank failed first)."""
    transition(ws, run_id, "running")
    try:
        result = work()
    except KeyboardInterrupt:
        transition(ws, run_id, "stopped")
        raise
    except Exception as exc:  # the process lives on; the run records why it failed
        if not record_failure:
            reporter.log(f"this process stopped with {failure_message(exc)}")
            raise
        message = failure_message(exc)
        if not isinstance(exc, TrainingError):
            reporter.log(traceback.format_exc(limit=6))
        reporter.log(f"failed: {message}")
        transition(ws, run_id, "failed", error=message)
        return {"status": "failed", "error": message}
    transition(ws, run_id, result["status"])  # the test accuracy was recorded by the evaluation itself
    return result


# ----------------------------------------------------------------------------------------------------
# Resuming and extending


def prepare_resume(ws: Workspace, run_id: str, epochs: int | None = None) -> Run:
    """Make a finished, stopped, failed or interrupted run ready to train on (queued), up to `epochs`.

    - A run that did not end its schedule (stopped, failed, interrupted) continues it from its last finished
      epoch; a new `epochs` stretches or shortens the rest of the same schedule.
    - A done run (all epochs, or early-stopped) is extended: the added epochs start from the last epoch's
      weights and optimizer state and get a learning-rate cycle of their own (see core/train/schedule.py).
    In both cases best.pt is replaced only when validation improves on it."""
    run = ws.run(run_id)
    now = status(ws, run_id)
    if now in ACTIVE:
        raise RunStateError(f"run {run_id} is already {now}")
    if not run.last_path.exists():
        raise RunStateError(f"run {run_id} has no finished epoch to resume from; start a new run instead")
    cfg = run.config()
    try:  # the epoch of last.pt, from its sidecar (no torch here); the index if the sidecar is missing
        done = json.loads(run.last_path.with_suffix(".json").read_text())["epoch"]
    except (OSError, ValueError, KeyError):
        done = ws.run_row(run_id)["epochs_done"]
    target = epochs or cfg.epochs
    if target <= done:
        raise RunStateError(f"run {run_id} has finished {done} epochs: ask for more than {done} to train on")
    if now == "done":
        cfg.schedule_start_epoch = done
    cfg.epochs = target
    run.write_config(cfg)
    ws.update_run(run_id, epochs=target)
    transition(ws, run_id, "queued")
    run.log(f"queued to train up to epoch {target}" + (" (extension: a new learning-rate cycle from epoch "
                                                         f"{done + 1})" if now == "done" else ""))
    return run


def last_run(ws: Workspace, data: str) -> Run | None:
    """The newest training run on this dataset (cross-validations aside)."""
    for row in ws.list_runs():
        try:
            run = ws.run(row["id"])
            cfg = run.config()
        except (KeyError, OSError, ValueError):
            continue  # a run folder removed or half-written
        if cfg.data == data and cfg.kind == TRAINING:
            return run
    return None


def last_config(ws: Workspace, data: str) -> TrainConfig | None:
    """The config of the newest training run on this dataset, to offer it again."""
    run = last_run(ws, data)
    return run.config() if run else None


def skipped_files(skipped) -> list[dict]:
    """(path, reason) pairs as {"path", "kind", "reason"}: kind is empty, not an image, too many pixels,
    truncated or unreadable."""
    from core.data.images import skip_kind
    return [{"path": p, "kind": skip_kind(r), "reason": r} for p, r in skipped]
