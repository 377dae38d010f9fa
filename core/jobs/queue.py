"""Background training jobs: one worker thread runs one job at a time; more are queued.

Pages (or any caller) only submit, stop, and read snapshots. Each job trains in a process of its own
(`python -m core job RUN_ID`, core/jobs/worker.py), which the worker thread starts and waits for: a crash there, even
the out-of-memory killer, fails the run and leaves the studio serving. A job's status is its run's status, owned
by core/runs/life.py; a snapshot adds the live progress the training process writes (batch, speed, ETA, log).
Importing this module does not import torch, and the studio never needs to for training.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field

from core.config import TrainConfig
from core.jobs import worker
from core.runs import life as runs
from core.workspace.store import ACTIVE, Workspace, pid_alive

LOG_LINES = 200
STOP_GRACE_S = 60.0  # a stop is answered within one batch or one evaluation pass; a process silent this long after
KILL_AFTER_S = 15.0  # the request is terminated (SIGTERM to its session), and killed (SIGKILL) this long after that
OTHERS_POLL_S = 1.0  # how often a queued job looks whether another process's training has ended


@dataclass
class JobSnapshot:
    run_id: str
    status: str
    stage: str = ""
    stage_done: int = 0
    stage_total: int = 0
    epoch: int = 0
    epochs: int = 0
    batch: int = 0
    batches: int = 0
    images_per_s: float = 0.0
    eta_s: float | None = None
    history: list = field(default_factory=list)
    log: list = field(default_factory=list)
    error: str | None = None
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    test_acc: float | None = None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def progress(self) -> float:
        """Fraction of the whole job done, 0..1."""
        if self.status == "done":
            return 1.0
        if not self.epochs:
            return 0.0
        within = self.batch / self.batches if self.batches else 0.0
        return min(1.0, (max(self.epoch - 1, 0) + within) / self.epochs)


def log_tail(run, lines: int = LOG_LINES) -> list[str]:
    """The last lines of a run's log (read from the end: a log listing thousands of skipped files stays cheap)."""
    try:
        with open(run.log_path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


class Job:
    """One queued run and the process that trains it."""

    def __init__(self, ws: Workspace, run_id: str, epochs: int, resume: bool = False,
                 grace_s: float = STOP_GRACE_S, kill_after_s: float = KILL_AFTER_S):
        self.ws = ws
        self.run = ws.run(run_id)
        self.resume = resume
        self.epochs = epochs
        self.grace_s, self.kill_after_s = grace_s, kill_after_s
        self.stop_event = threading.Event()
        self.done_event = threading.Event()
        self.process = None
        self.stop_asked: float | None = None  # time.monotonic() of the first stop request
        self.escalated = ""                    # "", "terminated" or "killed": what a stop that went unanswered took
        self._start_history = worker.job_history(self.run, resume)

    def request_stop(self) -> None:
        if self.stop_asked is None:
            self.stop_asked = time.monotonic()
        self.stop_event.set()
        worker.request_stop(self.run)

    # --- reading ------------------------------------------------------------------------------------
    def snapshot(self) -> JobSnapshot:
        """Live progress from the training process's files, status and times from the run's owner."""
        row = self.ws.run_row(self.run.id) or {}
        p = worker.read_progress(self.run) if self.process is not None else {}
        snap = JobSnapshot(run_id=self.run.id, status=row.get("status", "queued"), stage=p.get("stage", ""),
                           stage_done=p.get("stage_done", 0), stage_total=p.get("stage_total", 0),
                           epoch=p.get("epoch", 0), epochs=p.get("epochs", self.epochs), batch=p.get("batch", 0),
                           batches=p.get("batches", 0), images_per_s=p.get("images_per_s", 0.0),
                           eta_s=p.get("eta_s"), history=p.get("history", self._start_history),
                           log=log_tail(self.run), error=row.get("error"), created=row.get("created", 0.0),
                           started=row.get("started"), finished=row.get("finished"), test_acc=row.get("test_acc"))
        if snap.status not in ACTIVE:
            snap.stage = ""
            snap.eta_s = 0.0 if snap.status == "done" else None
        return snap

    # --- running (worker thread) --------------------------------------------------------------------
    def execute(self) -> None:
        try:
            if self.stop_event.is_set():  # stopped while queued: it never starts
                runs.transition(self.ws, self.run.id, "stopped")
                return
            (self.run.dir / worker.PROGRESS_FILE).unlink(missing_ok=True)
            worker.clear_stop(self.run)  # a request left by a process that died before serving it
            try:
                self.process = worker.start_process(self.ws, self.run, self.resume)
            except OSError as exc:
                runs.transition(self.ws, self.run.id, "failed", error=f"could not start the training process: {exc}")
                return
            if self.stop_event.is_set():
                worker.request_stop(self.run)
            self._wait_for_process()
            if self.escalated:
                self._record_forced_stop()
            worker.finish_process(self.ws, self.run, self.process)
        except Exception as exc:  # noqa: BLE001 - the worker thread serves the next job whatever happened here
            try:
                runs.transition(self.ws, self.run.id, "failed", error=f"{type(exc).__name__}: {exc}")
            except (runs.RunStateError, KeyError, OSError):
                pass
        finally:
            try:
                worker.clear_stop(self.run)
            finally:  # waiters are released whatever happened
                self.done_event.set()

    def _wait_for_process(self) -> None:
        """Wait for the training process; once a stop has gone unanswered for grace_s, terminate it, and kill it
        kill_after_s later: a hung training must not hold the queue behind it for ever."""
        terminated_at = None
        while True:
            try:
                self.process.wait(timeout=0.5)
                return
            except subprocess.TimeoutExpired:
                pass
            if self.stop_asked is None:
                continue
            now = time.monotonic()
            if terminated_at is None and now - self.stop_asked > self.grace_s:
                self.run.log(f"stop: no answer {self.grace_s:g} s after the request: terminating the training process "
                             f"(pid {self.process.pid}, SIGTERM)")
                worker.kill_session(self.process.pid, signal.SIGTERM)
                terminated_at, self.escalated = now, "terminated"
            elif terminated_at is not None and now - terminated_at > self.kill_after_s and self.escalated != "killed":
                self.run.log(f"stop: still running {self.kill_after_s:g} s after SIGTERM: killing it (SIGKILL)")
                worker.kill_session(self.process.pid, signal.SIGKILL)
                self.escalated = "killed"

    def _record_forced_stop(self) -> None:
        how = "terminated" if self.escalated == "terminated" else "terminated, then killed"
        try:
            runs.transition(self.ws, self.run.id, "stopped",
                            error=f"it did not stop within {self.grace_s:g} s of the request, so its process was "
                                  f"{how}; the best checkpoint is kept")
        except runs.RunStateError:
            pass  # it ended on its own meanwhile


class JobManager:
    """Shared by every page and session of one process (the studio keeps one in st.cache_resource)."""

    def __init__(self, ws: Workspace, stop_grace_s: float = STOP_GRACE_S, kill_after_s: float = KILL_AFTER_S):
        self.ws = ws
        self.stop_grace_s, self.kill_after_s = stop_grace_s, kill_after_s
        self.interrupted = runs.mark_interrupted(ws)
        self._jobs: dict[str, Job] = {}
        self._queue: deque[Job] = deque()
        self._requests: dict[str, str | threading.Event] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._worker = threading.Thread(target=self._work, name="training-worker", daemon=True)
        self._worker.start()

    def submit(self, cfg: TrainConfig, request_id: str | None = None, label_version: int | None = None) -> str:
        """Validate and prepare a run now (errors raise here, nothing starts), then queue it.
        The same request_id twice (a double click, two tabs) gives the same run, not a second job."""
        return self._submit(cfg, request_id, lambda: runs.prepare_run(self.ws, cfg, label_version=label_version))

    def submit_crossval(self, cfg: TrainConfig, folds: int = 5, request_id: str | None = None) -> str:
        """Queue k-fold cross-validation (out-of-sample probabilities for finding label errors)."""
        from core.studies.curation import as_crossval
        cfg = as_crossval(cfg, folds)
        return self._submit(cfg, request_id, lambda: runs.prepare_run(self.ws, cfg))

    def submit_learning_curve(self, run_id: str, epochs: int | None = None, request_id: str | None = None) -> str:
        """Queue a learning curve of run `run_id`: its recipe on 25/50/75/100% of its training part
        (core/studies/learning_curve.py).
        `epochs`: fewer epochs per fraction than the run's, to keep it short on a CPU."""
        from core.studies.learning_curve import as_learning_curve
        cfg = as_learning_curve(self.ws.run(run_id).config(), run_id, epochs=epochs)
        return self._submit(cfg, request_id, lambda: runs.prepare_derived(self.ws, run_id, cfg))

    def _submit(self, cfg: TrainConfig, request_id: str | None, prepare) -> str:
        # The request id is taken before the run is prepared: an identical request arriving meanwhile (a
        # double click, Enter then a click) waits for this one and gets its run instead of making a second.
        with self._lock:
            claim = self._requests.get(request_id) if request_id else None
            if claim is None and request_id:
                self._requests[request_id] = threading.Event()
        if isinstance(claim, threading.Event):
            claim.wait(120)
            claim = self._requests.get(request_id)
        if isinstance(claim, str):
            return claim
        try:
            run = prepare()
        except BaseException:
            with self._lock:
                pending = self._requests.pop(request_id, None) if request_id else None
            if isinstance(pending, threading.Event):
                pending.set()
            raise
        with self._lock:
            pending = self._requests.get(request_id) if request_id else None
            if request_id:
                self._requests[request_id] = run.id
            self._enqueue(self._job(run.id, worker.job_epochs(cfg)))
        if isinstance(pending, threading.Event):
            pending.set()
        return run.id

    def resume(self, run_id: str, epochs: int | None = None) -> str:
        """Queue a stopped, failed or interrupted run to continue, or a done one to train on to `epochs`
        (core/runs/life.py's prepare_resume says how). RunStateError or KeyError say why not."""
        with self._lock:
            job = self._jobs.get(run_id)
            if job is not None and not job.done_event.is_set():
                raise runs.RunStateError(f"run {run_id} is already {job.snapshot().status}")
        run = runs.prepare_resume(self.ws, run_id, epochs)
        job = self._job(run_id, run.config().epochs, resume=True)
        with self._lock:
            self._enqueue(job)
        return run_id

    def _job(self, run_id: str, epochs: int, resume: bool = False) -> Job:
        return Job(self.ws, run_id, epochs, resume, self.stop_grace_s, self.kill_after_s)

    def _enqueue(self, job: Job) -> None:
        self._jobs[job.run.id] = job
        self._queue.append(job)
        self._wake.notify_all()

    def stop(self, run_id: str) -> bool:
        """Ask a job to stop: a queued one never starts; a running one stops within one batch. A run training in
        a process this manager did not start (the CLI, a studio restarted meanwhile) is asked through its stop
        request too."""
        with self._lock:
            job = self._jobs.get(run_id)
        if job is None or job.done_event.is_set():
            row = self.ws.run_row(run_id)
            if job is None and row and row["status"] in ("running", "stopping") and pid_alive(row["pid"],
                                                                                            row["pid_started"]):
                worker.request_stop(self.ws.run(run_id))
                try:
                    runs.transition(self.ws, run_id, "stopping")
                except runs.RunStateError:
                    pass
                threading.Thread(target=self._escalate_foreign, args=(run_id, row["pid"], row["pid_started"]),
                                 name=f"stop-{run_id}", daemon=True).start()
                return True
            return False
        job.request_stop()
        try:
            runs.transition(self.ws, run_id, "stopping")
        except runs.RunStateError:
            pass  # queued (it will never start), or already ending
        return True

    def _escalate_foreign(self, run_id: str, pid: int, started: float | None) -> None:
        """The same escalation for a run another process trains (the CLI, an earlier studio): terminated after the
        grace, killed after that, then recorded as stopped."""
        run = self.ws.run(run_id)
        for sig, wait_s, name in ((signal.SIGTERM, self.stop_grace_s, "terminating"),
                                  (signal.SIGKILL, self.kill_after_s, "killing")):
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if not pid_alive(pid, started):
                    break
                time.sleep(0.2)
            if not pid_alive(pid, started):
                break
            run.log(f"stop: no answer from process {pid} within {wait_s:g} s: {name} it")
            try:  # not ours: its whole group when it leads one (a CLI's torchrun and its ranks), else itself
                if os.getpgid(pid) == pid:
                    worker.kill_session(pid, sig)
                else:
                    os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        for _ in range(50):
            if not pid_alive(pid, started):
                break
            time.sleep(0.1)
        row = self.ws.run_row(run_id) or {}
        if row.get("status") in ACTIVE and not pid_alive(pid, started):
            try:
                runs.transition(self.ws, run_id, "stopped",
                                error=f"its process (pid {pid}) did not stop within {self.stop_grace_s:g} s of the "
                                      "request and was ended; the best checkpoint is kept")
            except runs.RunStateError:
                pass

    def snapshot(self, run_id: str) -> JobSnapshot | None:
        with self._lock:
            job = self._jobs.get(run_id)
        if job is not None:
            return job.snapshot()
        row = self.ws.run_row(run_id)
        if row is None:
            return None
        run = self.ws.run(run_id)
        snap = JobSnapshot(run_id=run_id, status=row["status"], epoch=row["epochs_done"], epochs=row["epochs"],
                           history=run.history(), log=log_tail(run), error=row["error"], created=row["created"],
                           started=row["started"], finished=row["finished"], test_acc=row["test_acc"])
        if row["status"] in ("running", "stopping"):  # trained by another process (the CLI): its progress file
            p = worker.read_progress(run)
            for name in ("stage", "stage_done", "stage_total", "batch", "batches", "images_per_s", "eta_s"):
                if name in p:
                    setattr(snap, name, p[name])
        return snap

    def active(self) -> JobSnapshot | None:
        """The running job, else the next queued one, else None."""
        with self._lock:
            jobs = [j for j in self._jobs.values() if not j.done_event.is_set()]
        snaps = [j.snapshot() for j in jobs]
        running = [s for s in snaps if s.status in ("running", "stopping")]
        queued = [s for s in snaps if s.status == "queued"]
        if not running and (other := self.training_elsewhere()) is not None:
            running = [self.snapshot(other["id"])]  # the CLI's, an earlier studio's
        return (running or queued or [None])[0]

    def training_elsewhere(self) -> dict | None:
        """The run row another process is training on this workspace right now (the CLI, a second studio), if any."""
        with self._lock:
            mine = {j.run.id for j in self._jobs.values() if not j.done_event.is_set()}
        for row in self.ws.list_runs():
            if (row["status"] in ("running", "stopping") and row["id"] not in mine
                    and pid_alive(row["pid"], row["pid_started"])):
                return row
        return None

    def _wait_for_others(self, job: Job) -> None:
        """One training at a time on a workspace, whoever started it: the next job waits (still queued) while
        another process trains, unless it is stopped meanwhile."""
        said = False
        while not job.stop_event.is_set() and (other := self.training_elsewhere()) is not None:
            if not said:
                job.run.log(f"queued: waits for run {other['id']}, which another process (pid {other['pid']}) trains")
                said = True
            time.sleep(OTHERS_POLL_S)

    def queued(self) -> list[str]:
        with self._lock:
            return [j.run.id for j in self._queue]

    def wait(self, run_id: str, timeout: float | None = None) -> JobSnapshot:
        with self._lock:
            job = self._jobs[run_id]
        job.done_event.wait(timeout)
        return job.snapshot()

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue:
                    self._wake.wait()
                job = self._queue[0]
            self._wait_for_others(job)
            with self._lock:
                if self._queue and self._queue[0] is job:
                    self._queue.popleft()
            try:
                job.execute()
            except Exception:  # noqa: BLE001 - e.g. the failure could not be recorded (a full disk, the database
                # gone): the one training thread lives on to serve the next job
                traceback.print_exc()
