"""Training as its own process: the studio's job thread starts `python -m core job RUN_ID`, and that process trains
the run, owning its life (core/runs/life.py) as the CLI does. A crash there, even the out-of-memory killer's SIGKILL,
ends that process, never the studio; the job thread sees the exit and records why.

What crosses between the two, all in the run's folder (readable by any process, a restarted studio too):
    progress.json   stage, epoch, batch, speed, ETA and the job's epoch rows: rewritten (atomically) by the training
                    process at most every PROGRESS_EVERY_S seconds and at every stage and epoch
    log.txt         the log, one line per message (written by Run.log)
    stop.request    exists while a stop is asked for: the training process checks it before every batch
    metrics.csv, checkpoints, the database row: as for any run

No torch here: the studio imports this at start-up.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from core.config import CROSSVAL, LEARNING_CURVE, TRAINING
from core.runs import life as runs
from core.runs.life import Reporter, exit_reason
from core.workspace.files import write_text_atomic
from core.workspace.store import ACTIVE, Run, Workspace

PROGRESS_EVERY_S = 0.5
STOP_FILE = "stop.request"
PROGRESS_FILE = "progress.json"
LAUNCHED_RUN = "STUDIO_LAUNCHED_RUN"  # set by our launcher for its ranks: the run they train
# Composite jobs (several trainings in sequence) run on one device; their sub-runs are small.
SINGLE_DEVICE_KINDS = (CROSSVAL, LEARNING_CURVE)


def launched_by_torchrun() -> bool:
    """Whether this process is a rank started by torch.distributed.elastic (torchrun, or our launcher), which
    sets these in every rank's environment."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


# ----------------------------------------------------------------------------------------------------
# Stop requests: a file, so that any process can ask and any training process can see it


def stop_path(run: Run) -> Path:
    return run.dir / STOP_FILE


def request_stop(run: Run) -> None:
    stop_path(run).write_text(str(time.time()))


def clear_stop(run: Run) -> None:
    stop_path(run).unlink(missing_ok=True)


def stop_requested(run: Run) -> bool:
    return stop_path(run).exists()


def read_progress(run: Run) -> dict:
    try:
        return json.loads((run.dir / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return {}


# ----------------------------------------------------------------------------------------------------
# In the training process


class RunReporter(Reporter):
    """Training's reporter in its own process: the log to log.txt (and `echo`, e.g. stderr), progress to
    progress.json, the stop request from stop.request."""

    def __init__(self, run: Run, epochs: int, history: list | None = None, echo=None):
        self.run, self.echo = run, echo
        self.state = {"stage": "", "stage_done": 0, "stage_total": 0, "epoch": 0, "epochs": epochs, "batch": 0,
                      "batches": 0, "images_per_s": 0.0, "eta_s": None, "history": list(history or []),
                      "pid": os.getpid()}
        self._written = 0.0
        self._batch_times: deque[float] = deque(maxlen=50)
        self._last_batch_t: float | None = None

    def _write(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._written < PROGRESS_EVERY_S:
            return
        self._written = now
        try:  # rewritten twice a second for the live view: not worth a flush to disk each time
            write_text_atomic(self.run.dir / PROGRESS_FILE, json.dumps({**self.state, "updated": time.time()}),
                              durable=False)
        except OSError:
            pass  # a full disk stops the progress view, not the training

    def log(self, message: str) -> None:
        try:
            self.run.log(message)
        except OSError:
            pass
        if self.echo is not None:
            print(message, file=self.echo, flush=True)

    def stage(self, name: str, done: int = 0, total: int = 0) -> None:
        changed = name != self.state["stage"]
        self.state.update(stage=name, stage_done=done, stage_total=total)
        self._write(force=changed or (total and done >= total))

    def batch(self, epoch: int, batch: int, batches: int, images_per_s: float) -> None:
        now = time.perf_counter()
        if self._last_batch_t is not None and batch > 1:
            self._batch_times.append(now - self._last_batch_t)
        self._last_batch_t = now
        s = self.state
        s.update(epoch=epoch, batch=batch, batches=batches, images_per_s=images_per_s)
        if self._batch_times:
            per_batch = sum(self._batch_times) / len(self._batch_times)
            # Validation costs roughly a sixth of an epoch's batches; count it in.
            s["eta_s"] = per_batch * (batches - batch) + per_batch * batches * 1.15 * (s["epochs"] - epoch)
        self._write()

    def epoch_end(self, row: dict) -> None:
        self.state["history"].append(row)
        self.state["epoch"] = row["epoch"]
        self._write(force=True)

    def should_stop(self) -> bool:
        return stop_requested(self.run)

    def close(self) -> None:
        self._write(force=True)


def work_run(ws: Workspace, run_id: str, resume: bool, reporter: Reporter, ranks) -> dict:
    """Train a queued run according to its kind (a training, a cross-validation, a learning curve)."""
    run = ws.run(run_id)
    cfg = run.config()
    if cfg.kind == CROSSVAL:
        from core.studies.curation import crossval
        return crossval(ws, run, reporter, folds=int(cfg.extra.get("folds", 4)))
    if cfg.kind == LEARNING_CURVE:
        from core.studies.learning_curve import learning_curve
        return learning_curve(ws, run, reporter)
    from core.train.loop import fit
    return fit(ws, run, reporter=reporter, resume=resume, ranks=ranks)


def run_job(ws: Workspace, run_id: str, resume: bool = False, echo=None, reporter: Reporter | None = None) -> dict:
    """The training process's whole work on a queued run, in one of three roles:
    - one device: train it here, owning its life (running, then done / stopped / failed);
    - a launcher (the run's config asks for several devices, and this process was not started by torchrun):
      start that many ranks on this machine through torch.distributed.elastic and wait; a rank that dies fails
      the run with the rank and the reason;
    - a rank (started by torchrun or by a launcher): train its share; rank 0 owns the run's life.
    Rank 0 reports to `reporter` when one is given (the command line's progress bar), else to the run's files
    (what the studio reads). Every way of training a prepared run comes here: the studio's process, `core train`
    and `core resume` in the foreground, and each rank under torchrun. Returns {"status", ...}."""
    from core.train import distributed
    run = ws.run(run_id)
    cfg = run.config()
    ranks = distributed.Ranks.from_env()
    if cfg.devices > 1 and cfg.kind not in SINGLE_DEVICE_KINDS and not launched_by_torchrun():
        return _as_launcher(ws, run, resume, cfg.devices)
    own_reporter = reporter is None or not ranks.main
    if own_reporter:
        reporter = RunReporter(run, job_epochs(cfg), job_history(run, resume), echo=echo) if ranks.main else \
            _RankReporter(run)
    # Under our launcher, a failure of rank 0 may only echo another rank's (a peer that died closes the
    # connection): the launcher records the first rank to fail and why. Alone, or under a bare torchrun, rank 0
    # records what it saw. Other ranks never write the run's status.
    launched = ranks.distributed and os.environ.get(LAUNCHED_RUN) == run.id
    def work():
        return work_run(ws, run.id, resume, reporter, ranks)

    try:
        result = runs.execute(ws, run.id, work, reporter, record_failure=not launched) if ranks.main else work()
        if result.get("status") != "failed":
            distributed.barrier()  # several devices: wait for rank 0's evaluation, leave the process group together
        return result
    finally:
        if ranks.main and own_reporter:
            reporter.close()
        distributed.stop()


class _RankReporter(Reporter):
    """Ranks other than 0 report nothing; they see a stop request as rank 0 does (the per-step all-reduce makes
    all stop after the same batch)."""

    def __init__(self, run: Run):
        self.run = run

    def should_stop(self) -> bool:
        return stop_requested(self.run)


def _as_launcher(ws: Workspace, run: Run, resume: bool, devices: int) -> dict:
    from core.errors import UserError
    from core.train import distributed
    cfg = run.config()
    try:
        distributed.check_devices(devices, cfg.device)
        args = ["--workspace", str(ws.root), "job", run.id] + (["--resume"] if resume else [])
        os.environ[LAUNCHED_RUN] = run.id  # the ranks inherit it
        distributed.launch_local(devices, args, job_id=run.id)
    except UserError as exc:  # distributed.RankFailure, or too few GPUs
        row = ws.run_row(run.id) or {}
        if row.get("status") in ACTIVE:
            try:
                runs.transition(ws, run.id, "failed", error=str(exc))
                run.log(f"failed: {exc}")
            except runs.RunStateError:
                pass
        return {"status": "failed", "error": str(exc)}
    return {"status": (ws.run_row(run.id) or {}).get("status", "failed")}


def job_epochs(cfg) -> int:
    """Epochs a job trains in all: a cross-validation trains each fold, a learning curve each fraction."""
    if cfg.kind == CROSSVAL:
        return cfg.epochs * int(cfg.extra.get("folds", 4))
    if cfg.kind == LEARNING_CURVE:
        return cfg.epochs * len(cfg.extra.get("fractions", ()) or (1,))
    return cfg.epochs


def job_history(run: Run, resume: bool) -> list:
    """The epoch rows a job starts with: a resumed training's earlier epochs."""
    return run.history() if resume and run.config().kind == TRAINING else []


# ----------------------------------------------------------------------------------------------------
# In the studio: starting and watching the training process


def job_command(run_id: str, resume: bool, workspace: Path, with_parent: bool = False) -> list[str]:
    return [sys.executable, "-m", "core", "--workspace", str(workspace), "job", run_id] + (
        ["--resume"] if resume else []) + (["--with-parent"] if with_parent else [])


def stop_with_parent(run: Run, grace_s: float = 60.0, interval_s: float = 1.0) -> None:
    """A job's training process ends with the studio that started it: when its parent is gone (the studio quit
    or was killed) it stops as if Stop was pressed (the run ends "stopped", best checkpoint kept and evaluated,
    resumable), and is killed if that takes longer than `grace_s`."""
    import threading
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(interval_s)
        request_stop(run)
        time.sleep(grace_s)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def child_env() -> dict:
    """The studio's environment, with this package importable wherever the studio was started from."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_process(ws: Workspace, run: Run, resume: bool):
    """The training process of a queued run, in a session of its own (so that ending it ends its ranks too),
    its output appended to the run's process.log: forked from the studio's warm fork server where it can be
    (core/jobs/forkserver.py: the seconds of imports are paid once per studio, not once per job), else started
    afresh. Returns a subprocess.Popen or a forkserver.ForkedProcess (pid, wait, returncode)."""
    from core.jobs import forkserver
    env = child_env()
    if forkserver.enabled():
        try:
            return forkserver.server(env).start(job_command(run.id, resume, ws.root, with_parent=True)[3:],
                                                str(run.dir / "process.log"), env, os.getcwd())
        except OSError as exc:  # no fork server now: a fresh process instead, as on other systems
            run.log(f"training process started afresh: {exc}")
    out = open(run.dir / "process.log", "ab")
    try:
        return subprocess.Popen(job_command(run.id, resume, ws.root, with_parent=True), env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        out.close()


def finish_process(ws: Workspace, run: Run, proc) -> str | None:
    """After the training process exited: if it left its run active (killed, crashed before it could record
    anything), the run fails with the reason. Anything the process left in its session is ended. Returns the
    failure message, or None when the process recorded the outcome itself."""
    code = proc.returncode
    kill_session(proc.pid)
    row = ws.run_row(run.id) or {}
    if row.get("status") not in ACTIVE:
        return None
    message = f"the training process (pid {proc.pid}) " + exit_reason(code, last_error_line(run))
    try:
        runs.transition(ws, run.id, "failed", error=message)
    except runs.RunStateError:
        return None  # it ended meanwhile
    run.log(f"failed: {message}")
    return message


def last_error_line(run: Run) -> str:
    """The last line of the process's output that looks like an error (for a process that died unrecorded)."""
    try:
        lines = (run.dir / "process.log").read_text(errors="replace").splitlines()[-40:]
    except OSError:
        return ""
    errors = [ln for ln in lines if "Error" in ln or "error:" in ln]
    return errors[-1].strip() if errors else ""


def kill_session(pid: int, sig: int = signal.SIGKILL) -> None:
    """A signal to a training process and everything in its session (its ranks, its loader workers): the process
    leads the session start_process gave it."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError, OSError):
        pass
