"""Training processes forked from the studio's warm fork server (core/jobs/forkserver.py), and started afresh
without it."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, tiny_config
from core.jobs import forkserver, worker
from core.jobs.queue import JobManager
from core.runs.life import prepare_run

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork server is Linux only")


def parent_of(pid: int) -> int:
    return int(open(f"/proc/{pid}/stat").read().split(") ")[-1].split()[1])


@pytest.mark.slow  # the first use starts the server: torch's imports
def test_a_forked_process_runs_the_command_line_in_its_own_environment_directory_and_output(tmp_path, workspace):
    server = forkserver.server(worker.child_env())
    log = tmp_path / "process.log"
    # `core` runs what the command line says: here, an unknown command (argparse: status 2, on stderr).
    child = server.start(["--workspace", str(workspace.root), "no-such-command"], str(log), worker.child_env(),
                         str(tmp_path))
    assert child.wait(60) == 2
    assert "invalid choice: 'no-such-command'" in log.read_text()
    # The environment and the directory are the request's, not the server's: a relative $STUDIO_WORKSPACE opens
    # in the directory given.
    env = dict(worker.child_env(), STUDIO_WORKSPACE="from-the-request")
    child = server.start(["runs", "--json"], str(log), env, str(tmp_path))
    assert child.wait(60) == 0 and log.read_text().rstrip().endswith("[]")
    assert (tmp_path / "from-the-request").is_dir() and not (ROOT / "from-the-request").exists()
    # The same server forks every process: its imports are paid once.
    assert forkserver.server(worker.child_env()) is server


@pytest.mark.slow
def test_a_failed_or_killed_child_reports_its_status_as_popen_would(dot_folder, workspace, tmp_path):
    server = forkserver.server(worker.child_env())
    log = tmp_path / "process.log"
    child = server.start(["--workspace", str(workspace.root), "job", "no-such-run"], str(log), worker.child_env(),
                         str(ROOT))
    assert child.wait(60) == 2 and "no-such-run" in log.read_text()  # a one-line error, status 2
    # Killed while it trains, it reports the signal: negative, as subprocess.Popen.returncode does.
    run = prepare_run(workspace, tiny_config(dot_folder, epochs=300))
    child = server.start(["--workspace", str(workspace.root), "job", run.id], str(log), worker.child_env(),
                         str(ROOT))
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(0.5)
    child.kill()
    assert child.wait(60) == -signal.SIGKILL
    assert "killed by signal 9 (SIGKILL)" in worker.finish_process(workspace, run, child)


@pytest.mark.slow
def test_jobs_train_in_forked_processes_and_a_dead_server_is_replaced(dot_folder, workspace):
    jm = JobManager(workspace)
    first = jm.submit(tiny_config(dot_folder, epochs=1))
    assert jm.wait(first, timeout=120).status == "done"
    process = jm._jobs[first].process
    assert isinstance(process, forkserver.ForkedProcess) and process.returncode == 0
    assert "epoch 1/1" in (workspace.run(first).dir / "process.log").read_text()
    assert workspace.run_row(first)["pid"] == process.pid  # the run records the forked process itself
    server = forkserver.server(worker.child_env())
    # The server dies (the out-of-memory killer, say): the next job gets a new one and trains all the same.
    server._proc.kill()
    server._proc.wait()
    second = jm.submit(tiny_config(dot_folder, epochs=1))
    assert jm.wait(second, timeout=120).status == "done"
    assert forkserver.server(worker.child_env()) is not server


@pytest.mark.slow
def test_a_training_process_is_a_child_of_the_server_while_it_runs(dot_folder, workspace):
    jm = JobManager(workspace)
    rid = jm.submit(tiny_config(dot_folder, epochs=200, batch_size=8))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (workspace.run_row(rid) or {}).get("epochs_done"):
        time.sleep(0.1)
    pid = workspace.run_row(rid)["pid"]
    assert parent_of(pid) == forkserver.server(worker.child_env())._proc.pid != os.getpid()
    assert os.getsid(pid) == pid  # a session of its own, so that ending it ends its ranks too
    assert jm.stop(rid)
    assert jm.wait(rid, timeout=60).status == "stopped"


@pytest.mark.slow
def test_without_the_fork_server_a_training_process_is_started_afresh(dot_folder, workspace, monkeypatch):
    monkeypatch.setenv(forkserver.ENABLE, "0")
    jm = JobManager(workspace)
    rid = jm.submit(tiny_config(dot_folder, epochs=1))
    assert jm.wait(rid, timeout=120).status == "done"
    assert isinstance(jm._jobs[rid].process, subprocess.Popen)
