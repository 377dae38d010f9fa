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
    jm = JobManager(workspace)
    # A weights file that exists (prepare_run accepts it) but holds no state_dict: the training process fails
    # while building the model, and says why.
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    bad = jm.submit(tiny_config(dot_folder, epochs=1, weights=str(tmp_path / "broken.pth")))
    snap = jm.wait(bad, timeout=60)
    assert snap.status == "failed" and "broken.pth" in snap.error
    assert workspace.run_row(bad)["status"] == "failed"
    good = jm.submit(tiny_config(dot_folder, epochs=1))
    assert jm.wait(good, timeout=60).status == "done"


def test_crashed_process_leaves_run_interrupted(dot_folder, workspace):
    run = prepare_run(workspace, tiny_config(dot_folder))
    workspace.update_run(run.id, status="running", pid=2**22 + 12345)  # a pid that does not exist
    JobManager(workspace)
    assert workspace.run_row(run.id)["status"] == "interrupted"
