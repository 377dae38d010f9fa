"""Training as its own process, and on several processes (core/jobs/worker.py, core/train/distributed.py): torchrun and our
launcher with the Gloo backend on the CPU, stop requests, and ranks or whole trainings killed with SIGKILL."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, tiny_config, write_class_folders
from core.jobs import worker
from core.jobs.queue import JobManager
from core.models.checkpoint import load_checkpoint
from core.models.resnet import model_from_checkpoint
from core.runs.life import prepare_run
from core.workspace.store import Workspace

pytestmark = [pytest.mark.slow,  # each starts processes of its own (see tests/README.md)
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the ranks")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_class_folders(tmp_path_factory.mktemp("ddp") / "d", per_class=24, size=32)


def processes_of(ws: Workspace, run_id: str) -> list[int]:
    """Live processes working on a run: its training process (forked by the studio's fork server, so found by the
    pid the run records, or started afresh with the run id on its command line), its ranks (the elastic agent
    gives them the run id as TORCHELASTIC_RUN_ID) and their launcher (the ranks' parent)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            env = (entry / "environ").read_bytes()
            state, ppid = (entry / "stat").read_text().split(") ")[-1].split()[:2]
        except (OSError, ValueError):
            continue
        if state != "Z":
            table[int(entry.name)] = (cmd, env, int(ppid))
    recorded = (ws.run_row(run_id) or {}).get("pid")
    ours = {pid for pid, (cmd, env, _) in table.items()
            if pid == recorded or run_id.encode() in cmd or f"TORCHELASTIC_RUN_ID={run_id}".encode() in env}
    ranks = [pid for pid in ours if f"TORCHELASTIC_RUN_ID={run_id}".encode() in table[pid][1]]
    launchers = {table[pid][2] for pid in ranks} - {os.getpid()}
    return sorted(ours | {pid for pid in launchers if pid in table})


def rank_pid(ws: Workspace, run_id: str, rank: int) -> int | None:
    for pid in processes_of(ws, run_id):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and f"TORCHELASTIC_RUN_ID={run_id}".encode() in env:
            return pid
    return None


def wait_for(condition, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_torchrun_two_processes_train_one_run(data, tmp_path):
    ws_root = tmp_path / "ws"
    flags = ["--data", str(data), "--recipe", "classic", "--weights", "none", "--epochs", "3", "--image-size", "32",
             "--batch-size", "8", "--seed", "1", "--json"]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "core", "--workspace", str(ws_root), "train", *flags],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=worker.child_env())
    assert out.returncode == 0, out.stderr[-3000:]
    printed = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1  # rank 0 alone reports
    doc = json.loads(printed[0])
    assert doc["status"] == "done"
    ws = Workspace(ws_root)
    assert [r["id"] for r in ws.list_runs()] == [doc["run_id"]]  # rank 1 made no run of its own
    run = ws.run(doc["run_id"])
    assert run.config().devices == 2
    assert [r["epoch"] for r in run.history()] == [1, 2, 3]  # metrics.csv: every epoch once
    log = run.log_path.read_text()
    assert all(log.count(f"epoch {e}/3:") == 1 for e in (1, 2, 3))  # one writer of the log
    _, meta, _ = load_checkpoint(run.best_path)
    model, _ = model_from_checkpoint(run.best_path)
    assert meta["config"]["devices"] == 2 and model.fc.out_features == 2
    assert ws.run_row(run.id)["test_acc"] is not None
    # That two ranks step like one process: the next test, on the weights themselves.


def test_two_processes_step_like_one_process_with_the_whole_batch(data, tmp_path):
    """2 processes x 8 images = 1 process x 16 on the same order of images: the same weights after a few steps
    (batch norm frozen, which makes each image's forward pass independent of the others in its batch)."""
    ws = Workspace(tmp_path / "ws")
    common = dict(epochs=2, batch_size=16, optimizer="sgd", lr=0.05, amp="off", batch_norm="frozen",
                  normalization="imagenet")
    one = prepare_run(ws, tiny_config(data, devices=1, **common))
    two = prepare_run(ws, tiny_config(data, devices=2, **common))
    assert one.split() == two.split()
    worker.run_job(ws, one.id)  # one process: this one
    proc = subprocess.run(worker.job_command(two.id, False, ws.root), cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=worker.child_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert ws.run_row(one.id)["status"] == ws.run_row(two.id)["status"] == "done"
    a, meta_a, _ = load_checkpoint(one.last_path)
    b, meta_b, _ = load_checkpoint(two.last_path)
    assert meta_a["epoch"] == meta_b["epoch"] == 2
    steps = 2 * (len(one.split()["train"]) // 16)
    assert steps >= 4
    h1, h2 = one.history(), two.history()
    assert h1[0]["train_loss"] != h1[1]["train_loss"]  # the steps did move the weights
    assert all(abs(r1["train_loss"] - r2["train_loss"]) < 1e-4 for r1, r2 in zip(h1, h2))
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())
    assert diff < 1e-4


def two_process_job(data, tmp_path):
    """A long 2-process job through the studio's job manager, once its first epoch is checkpointed."""
    ws = Workspace(tmp_path / "ws")
    jm = JobManager(ws)
    rid = jm.submit(tiny_config(data, epochs=300, devices=2, batch_size=8))
    run = ws.run(rid)
    wait_for(lambda: ws.run_row(rid)["epochs_done"] >= 1, 180, "a first epoch")  # recorded after its checkpoints
    return ws, jm, rid, run


def test_a_rank_killed_fails_the_run_naming_it_then_resume_works_and_stop_reaches_every_rank(data, tmp_path):
    """One run through three lives (each launch of two ranks costs half a minute of CPU on 2 cores): a rank killed
    fails it; resumed, it trains on from the last good checkpoint; stopped, every rank stops."""
    ws, jm, rid, run = two_process_job(data, tmp_path)
    os.kill(wait_for(lambda: rank_pid(ws, rid, 1), 30, "rank 1"), signal.SIGKILL)
    snap = jm.wait(rid, timeout=120)
    assert snap.status == "failed"
    assert "rank 1" in snap.error and "SIGKILL" in snap.error, snap.error
    wait_for(lambda: not processes_of(ws, rid), 30, "every process of the run to end")
    load_checkpoint(run.best_path)  # the last good checkpoint is kept
    done = ws.run_row(rid)["epochs_done"]

    jm.resume(rid)  # on towards its 300 epochs, from the last checkpoint
    wait_for(lambda: ws.run_row(rid)["epochs_done"] > done, 180, "an epoch after the resume")
    assert len(processes_of(ws, rid)) >= 3  # the launcher and two ranks
    assert jm.stop(rid)
    snap = jm.wait(rid, timeout=120)
    assert snap.status == "stopped", (snap.error, snap.log[-5:])
    assert "stopped by request; the best checkpoint is kept" in run.log_path.read_text()
    epochs = [r["epoch"] for r in run.history()]
    assert epochs == list(range(1, len(epochs) + 1)) and done < len(epochs) < 300  # on from where it failed
    load_checkpoint(run.best_path)
    assert run.eval_path.exists()  # the kept checkpoint is evaluated
    wait_for(lambda: not processes_of(ws, rid), 20, "the ranks to exit")
    assert not worker.stop_requested(run)  # served, then cleared


def test_a_training_process_killed_fails_its_run_and_the_studio_serves_on(data, tmp_path):
    """What the out-of-memory killer does to a training: its run fails with the reason; the job manager (the
    studio's) goes on to the next job."""
    ws = Workspace(tmp_path / "ws")
    jm = JobManager(ws)
    rid = jm.submit(tiny_config(data, epochs=300))
    run = ws.run(rid)
    snap = wait_for(lambda: (lambda s: s if s.history else None)(jm.snapshot(rid)), 120, "a first epoch")
    assert snap.status == "running" and snap.epochs == 300 and snap.log  # progress from the process's files
    assert run.best_path.exists()
    os.kill(jm._jobs[rid].process.pid, signal.SIGKILL)
    snap = jm.wait(rid, timeout=60)
    assert snap.status == "failed"
    assert "SIGKILL" in snap.error and "out-of-memory" in snap.error, snap.error
    next_id = jm.submit(tiny_config(data, epochs=1))
    assert jm.wait(next_id, timeout=120).status == "done"
    assert not processes_of(ws, rid)


def test_a_training_process_stops_when_the_studio_that_started_it_is_gone(data, tmp_path):
    """A studio killed (or quit) while training: its training process does not train on unseen; it stops as if
    Stop was pressed, so that the run is kept and can be resumed."""
    ws = Workspace(tmp_path / "ws")
    run = prepare_run(ws, tiny_config(data, epochs=300))
    studio = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from core.jobs import worker; from core.workspace.store import Workspace; "
        f"ws = Workspace({str(ws.root)!r}); worker.start_process(ws, ws.run({run.id!r}), False); time.sleep(600)")],
        cwd=ROOT, env=worker.child_env())
    try:
        wait_for(lambda: run.best_path.exists(), 120, "a first epoch")
        # Another studio on the same workspace sees the run as the active job (trained by a process not its own).
        other = JobManager(ws).active()
        assert other is not None and other.run_id == run.id and other.status == "running"
    finally:
        studio.kill()
        studio.wait()
    wait_for(lambda: ws.run_row(run.id)["status"] == "stopped", 90, "the run to stop")
    assert "stopped by request" in run.log_path.read_text()
    wait_for(lambda: not processes_of(ws, run.id), 30, "the training process to exit")


def test_a_device_count_the_batch_cannot_be_split_into_is_a_one_line_error(data, tmp_path):
    ws_root = tmp_path / "ws"
    for flags, field in ((["--devices", "2", "--batch-size", "1"], "batch_size"), (["--devices", "0"], "devices")):
        out = subprocess.run([sys.executable, "-m", "core", "--workspace", str(ws_root), "train", "--data", str(data),
                              "--recipe", "classic", "--weights", "none", *flags], cwd=ROOT, capture_output=True,
                             text=True, timeout=120, env=worker.child_env())
        assert out.returncode == 2, out.stderr[-2000:]
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and field in lines[0], out.stderr
    assert Workspace(ws_root).list_runs() == []  # nothing was created
