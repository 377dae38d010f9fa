"""A run's life: statuses, failures recorded with the reason, resuming and extending."""
import json

import numpy as np
import pytest

from conftest import tiny_config
from core.jobs.queue import JobManager
from core.runs import life as runs
from core.runs.life import RunStateError, prepare_run
from core.train.loop import fit
from core.train.schedule import epoch_batches, lr_at


def _train(ws, cfg):
    run = prepare_run(ws, cfg)
    result = runs.execute(ws, run.id, lambda: fit(ws, run), runs.Reporter())
    assert result["status"] == "done", result
    return run


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_extending_a_finished_run_trains_the_added_epochs_on_a_new_cycle(dot_folder, workspace, schedule):
    """Bug: 'Train up to epoch N' on a finished one-cycle run raised 'Tried to step 7 times'; a cosine run
    trained the added epochs at learning rate 0."""
    run = _train(workspace, tiny_config(dot_folder, epochs=2, schedule=schedule, optimizer="adamw"))
    best_before = json.loads(run.best_path.with_suffix(".json").read_text())
    if schedule == "onecycle":  # what the Runs page does: a job in a process of its own
        jm = JobManager(workspace)
        jm.resume(run.id, epochs=4)
        snap = jm.wait(run.id, timeout=120)
        assert snap.status == "done", snap.error
    else:  # the same two steps in this process (a process start costs seconds of imports)
        runs.prepare_resume(workspace, run.id, 4)
        result = runs.execute(workspace, run.id, lambda: fit(workspace, run, resume=True), runs.Reporter())
        assert result["status"] == "done", result
    hist = run.history()
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    steps = epoch_batches(len(run.split()["train"]), 16)
    expected = lr_at(run.config(), 2 * steps, steps)[0]
    assert hist[2]["lr"] == pytest.approx(expected)
    assert hist[2]["lr"] == pytest.approx(1e-3 / 25 if schedule == "onecycle" else 1e-3)
    assert min(h["lr"] for h in hist[2:]) > 0
    cfg = run.config()
    assert (cfg.epochs, cfg.schedule_start_epoch) == (4, 2)
    best_after = json.loads(run.best_path.with_suffix(".json").read_text())
    assert best_after["best"]["val_acc"] >= best_before["best"]["val_acc"]  # replaced only by a better epoch
    with pytest.raises(RunStateError, match="ask for more than 4"):
        runs.prepare_resume(workspace, run.id, 4)


def test_a_stopped_run_continues_its_own_schedule(dot_folder, workspace):
    from conftest import StopAfter
    run = prepare_run(workspace, tiny_config(dot_folder, epochs=4, schedule="cosine"))
    steps = epoch_batches(len(run.split()["train"]), 16)
    result = runs.execute(workspace, run.id, lambda: fit(workspace, run, StopAfter(2 * steps + 1)), runs.Reporter())
    assert result["status"] == "stopped" and result["epochs_done"] == 2
    runs.prepare_resume(workspace, run.id)
    assert runs.execute(workspace, run.id, lambda: fit(workspace, run, resume=True), runs.Reporter())["status"] == "done"
    lrs = [h["lr"] for h in run.history()]
    assert lrs == pytest.approx([1e-3 * (1 + np.cos(np.pi * e / 4)) / 2 for e in range(4)])
    assert run.config().schedule_start_epoch == 0


def test_status_moves_only_along_the_runs_life(dot_folder, workspace):
    run = prepare_run(workspace, tiny_config(dot_folder, epochs=1))
    assert runs.status(workspace, run.id) == "queued"
    with pytest.raises(RunStateError, match="cannot become done"):
        runs.transition(workspace, run.id, "done")
    runs.transition(workspace, run.id, "running")
    runs.transition(workspace, run.id, "stopping")
    runs.transition(workspace, run.id, "stopped")
    with pytest.raises(RunStateError, match="no finished epoch"):
        runs.prepare_resume(workspace, run.id)
    row = workspace.run_row(run.id)
    assert row["started"] and row["finished"] >= row["started"]


def test_a_failed_run_records_why(dot_folder, workspace):
    run = prepare_run(workspace, tiny_config(dot_folder, epochs=1))

    def broken():
        raise runs.TrainingError("the disk went away")
    result = runs.execute(workspace, run.id, broken, runs.Reporter())
    assert result == {"status": "failed", "error": "the disk went away"}
    row = workspace.run_row(run.id)
    assert row["status"] == "failed" and row["error"] == "the disk went away"
