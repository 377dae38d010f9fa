"""The studio's job queue: background jobs, stop, one at a time, a failing job, a crashed process."""
import threading
import time

import pytest

from conftest import tiny_config
from core.jobs.queue import JobManager
from core.runs.life import prepare_run


@pytest.mark.slow
def test_job_manager_runs_in_background_and_reports(dot_folder, workspace):
    jm = JobManager(workspace)
    run_id = jm.submit(tiny_config(dot_folder, epochs=2), request_id="click-1")
    assert jm.submit(tiny_config(dot_folder, epochs=2), request_id="click-1") == run_id  # double click
    snap = jm.wait(run_id, timeout=120)
    assert snap.status == "done", snap.error
    assert len(snap.history) == 2 and snap.progress == 1.0
    assert any("epoch 2/2" in line for line in snap.log)
    assert workspace.run_row(run_id)["status"] == "done"
    assert len(workspace.list_runs()) == 1


@pytest.mark.slow
def test_job_stop_is_honoured_and_queue_runs_one_at_a_time(dot_folder, workspace):
    jm = JobManager(workspace)
    first = jm.submit(tiny_config(dot_folder, epochs=200, batch_size=8))
    second = jm.submit(tiny_config(dot_folder, epochs=1))
    assert jm.queued() == [first, second] or jm.queued() == [second]
    assert jm.snapshot(second).status == "queued"
    # Wait for a finished epoch (a loaded 2-core machine can take more than 30 s for the first), then stop.
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        s = jm.snapshot(first)
        if s.status == "running" and s.history:
            break
        threading.Event().wait(0.05)
    assert s.history, "the first job finished no epoch in 180 s"
    assert jm.snapshot(second).status == "queued"
    assert jm.stop(first)
    snap = jm.wait(first, timeout=60)
    assert snap.status == "stopped" and snap.history
    assert workspace.run(first).best_path.exists()
    assert jm.wait(second, timeout=120).status == "done"


@pytest.mark.slow
def test_failing_job_reports_its_error_and_the_worker_lives_on(dot_folder, workspace, tmp_path):
    import torch
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS: the job would train")
    jm = JobManager(workspace)
    # A device that passes the config's check but that this machine lacks: the training process fails when it
    # picks the device, and says why. (A wrong weights file no longer gets this far: prepare_run reads it.)
    bad = jm.submit(tiny_config(dot_folder, epochs=1, device="mps"))
    snap = jm.wait(bad, timeout=60)
    assert snap.status == "failed" and "MPS was requested" in snap.error
    assert workspace.run_row(bad)["status"] == "failed"
    good = jm.submit(tiny_config(dot_folder, epochs=1))
    assert jm.wait(good, timeout=60).status == "done"


def test_crashed_process_leaves_run_interrupted(dot_folder, workspace):
    run = prepare_run(workspace, tiny_config(dot_folder))
    workspace.update_run(run.id, status="running", pid=2**22 + 12345)  # a pid that does not exist
    JobManager(workspace)
    assert workspace.run_row(run.id)["status"] == "interrupted"


def _sleeper():
    import subprocess
    import sys
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])


def test_a_reused_pid_does_not_keep_a_dead_run_alive(dot_folder, workspace):
    # A container's studio is PID 1 on every start; any pid is reused in time. The run's process is told by its
    # pid and its start time: a live process under the same pid, started at another time, is not the run's.
    import os

    from core.workspace.store import process_started
    sleeper = _sleeper()
    try:
        mine = prepare_run(workspace, tiny_config(dot_folder))  # queued by "an earlier studio" under our own pid
        workspace.update_run(mine.id, pid=os.getpid(), pid_started=process_started() - 3600)
        reused = prepare_run(workspace, tiny_config(dot_folder))
        workspace.update_run(reused.id, status="running", pid=sleeper.pid, pid_started=process_started(sleeper.pid) - 50)
        alive = prepare_run(workspace, tiny_config(dot_folder))
        workspace.update_run(alive.id, status="running", pid=sleeper.pid, pid_started=process_started(sleeper.pid))
        JobManager(workspace)
        assert workspace.run_row(mine.id)["status"] == "interrupted"
        assert workspace.run_row(reused.id)["status"] == "interrupted"
        assert workspace.run_row(alive.id)["status"] == "running"  # the same process, still training
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.slow
def test_a_queued_job_waits_for_a_training_in_another_process(dot_folder, workspace):
    # "Queue after the running job" when the running job is another process's (the CLI, a second studio): the
    # queued job must not start a second training at once.
    from core.workspace.store import process_started
    sleeper = _sleeper()  # stands for the other process
    try:
        other = prepare_run(workspace, tiny_config(dot_folder))
        workspace.update_run(other.id, status="running", pid=sleeper.pid, pid_started=process_started(sleeper.pid))
        jm = JobManager(workspace)
        queued = jm.submit(tiny_config(dot_folder, epochs=1))
        time.sleep(3)
        assert jm.snapshot(queued).status == "queued" and jm.training_elsewhere()["id"] == other.id
        assert any("waits for run " + other.id in line for line in jm.snapshot(queued).log)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert jm.wait(queued, timeout=120).status == "done"  # the other process gone, it trains


@pytest.mark.slow
def test_a_hung_training_is_terminated_after_the_grace_and_the_queue_goes_on(dot_folder, workspace):
    import os
    import signal
    jm = JobManager(workspace, stop_grace_s=1.0, kill_after_s=1.0)
    hung = jm.submit(tiny_config(dot_folder, epochs=200, batch_size=8))
    after = jm.submit(tiny_config(dot_folder, epochs=1))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (jm.snapshot(hung).status == "running" and jm.snapshot(hung).history):
        time.sleep(0.1)
    pid = workspace.run_row(hung)["pid"]
    os.kill(pid, signal.SIGSTOP)  # hung: it can no longer read its stop request (nor SIGTERM, until killed)
    assert jm.stop(hung)
    snap = jm.wait(hung, timeout=60)
    assert snap.status == "stopped" and "did not stop within 1 s" in snap.error and "killed" in snap.error
    assert any("terminating the training process" in line for line in snap.log)
    assert any("killing it (SIGKILL)" in line for line in snap.log)
    assert workspace.run(hung).best_path.exists()
    assert jm.wait(after, timeout=120).status == "done"
