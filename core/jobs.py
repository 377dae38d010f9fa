"""Background training jobs: one worker thread runs one job at a time; more are queued.

Pages (or any caller) only submit, stop, and read snapshots. The worker never touches any UI.
Statuses: queued, running, stopping, stopped, done, failed, interrupted (found active in the index
with its process gone, e.g. after a crash or kill).
"""
from __future__ import annotations

import os
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field, replace

from .config import TrainConfig
from .storage import ACTIVE, Workspace
from .train import Reporter, TrainingError, failure_message, fit, prepare_run

LOG_LINES = 200


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


class Job(Reporter):
    def __init__(self, ws: Workspace, run_id: str, epochs: int, resume: bool = False, extra_epochs=None,
                 work=None):
        self.ws = ws
        self.work = work  # None: train with fit(); else work(ws, run, reporter) -> {"status": ...}
        self.run = ws.run(run_id)
        self.resume = resume
        self.epochs_override = extra_epochs
        self.stop_event = threading.Event()
        self.done_event = threading.Event()
        self._lock = threading.Lock()
        self._log: deque[str] = deque(maxlen=LOG_LINES)
        self._snap = JobSnapshot(run_id=run_id, status="queued", epochs=epochs, created=time.time(),
                                 history=self.run.history() if resume else [])
        self._batch_times: deque[float] = deque(maxlen=50)
        self._last_batch_t: float | None = None

    # --- Reporter (called from the worker thread) ---------------------------------------------------
    def log(self, message: str) -> None:
        with self._lock:
            self._log.append(message)
        try:
            self.run.log(message)
        except OSError:
            pass

    def stage(self, name: str, done: int = 0, total: int = 0) -> None:
        with self._lock:
            self._snap.stage, self._snap.stage_done, self._snap.stage_total = name, done, total

    def batch(self, epoch: int, batch: int, batches: int, images_per_s: float) -> None:
        now = time.perf_counter()
        with self._lock:
            if self._last_batch_t is not None and batch > 1:
                self._batch_times.append(now - self._last_batch_t)
            self._last_batch_t = now
            s = self._snap
            s.epoch, s.batch, s.batches, s.images_per_s = epoch, batch, batches, images_per_s
            if self._batch_times:
                per_batch = sum(self._batch_times) / len(self._batch_times)
                # Validation costs roughly a third of an epoch's batches; count it in.
                epoch_cost = per_batch * batches * 1.15
                s.eta_s = per_batch * (batches - batch) + epoch_cost * (s.epochs - epoch)

    def epoch_end(self, row: dict) -> None:
        with self._lock:
            self._snap.history = self._snap.history + [row]
            self._snap.epoch = row["epoch"]

    def should_stop(self) -> bool:
        return self.stop_event.is_set()

    # --- reading ------------------------------------------------------------------------------------
    def snapshot(self) -> JobSnapshot:
        with self._lock:
            return replace(self._snap, history=list(self._snap.history), log=list(self._log))

    def _set(self, **kw) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self._snap, k, v)

    # --- running (worker thread) --------------------------------------------------------------------
    def execute(self) -> None:
        ws, run_id = self.ws, self.run.id
        if self.stop_event.is_set():
            self._finish("stopped")
            return
        started = time.time()
        self._set(status="running", started=started)
        ws.update_run(run_id, status="running", started=started, pid=os.getpid(), error=None, finished=None)
        try:
            if self.work is not None:
                result = self.work(ws, self.run, self)
            else:
                result = fit(ws, self.run, reporter=self, resume=self.resume, epochs=self.epochs_override)
            self._set(test_acc=result.get("test_acc"))
            self._finish(result["status"])
        except (TrainingError, Exception) as exc:  # the process lives on; the job records why it failed
            message = failure_message(exc)
            if not isinstance(exc, TrainingError):
                self.log(traceback.format_exc(limit=6))
            self.log(f"failed: {message}")
            self._finish("failed", message)

    def _finish(self, status: str, error: str | None = None) -> None:
        now = time.time()
        self._set(status=status, error=error, finished=now, stage="", eta_s=0.0 if status == "done" else None)
        try:
            self.ws.update_run(self.run.id, status=status, error=error, finished=now)
        finally:
            self.done_event.set()


class JobManager:
    """Shared by every page and session of one process (the studio keeps one in st.cache_resource)."""

    def __init__(self, ws: Workspace):
        self.ws = ws
        self.interrupted = ws.mark_interrupted()
        self._jobs: dict[str, Job] = {}
        self._queue: deque[Job] = deque()
        self._requests: dict[str, str] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._worker = threading.Thread(target=self._work, name="training-worker", daemon=True)
        self._worker.start()

    def submit(self, cfg: TrainConfig, request_id: str | None = None, label_version: int | None = None) -> str:
        """Validate and prepare a run now (errors raise here, nothing starts), then queue it.
        The same request_id twice (a double click, two tabs) gives the same run, not a second job."""
        return self._submit(cfg, request_id, label_version, epochs=cfg.epochs)

    def submit_crossval(self, cfg: TrainConfig, folds: int = 4, request_id: str | None = None) -> str:
        """Queue k-fold cross-validation (out-of-sample probabilities for finding label errors)."""
        from .curation import crossval
        if not 2 <= folds <= 10:
            raise ValueError("folds must be between 2 and 10")
        cfg.extra = {**cfg.extra, "kind": "crossval", "folds": folds}
        cfg.test_fraction = 0.0  # every labeled image gets an out-of-sample prediction
        return self._submit(cfg, request_id, None, epochs=cfg.epochs * folds,
                            work=lambda ws, r, rep: crossval(ws, r, rep, folds=folds))

    def _submit(self, cfg: TrainConfig, request_id: str | None, label_version: int | None, epochs: int,
                work=None) -> str:
        with self._lock:
            if request_id and request_id in self._requests:
                return self._requests[request_id]
        run = prepare_run(self.ws, cfg, label_version=label_version)
        job = Job(self.ws, run.id, epochs, work=work)
        with self._lock:
            if request_id and request_id in self._requests:  # lost a race with an identical request
                self.ws.update_run(run.id, status="stopped", error="duplicate request")
                return self._requests[request_id]
            if request_id:
                self._requests[request_id] = run.id
            self._enqueue(job)
        return run.id

    def resume(self, run_id: str, epochs: int | None = None) -> str:
        row = self.ws.run_row(run_id)
        if row is None:
            raise KeyError(f"no run {run_id!r}")
        with self._lock:
            job = self._jobs.get(run_id)
            if (job and job.snapshot().active) or (row["status"] in ACTIVE and not job):
                raise RuntimeError(f"run {run_id} is already {row['status']}")
        if not self.ws.run(run_id).last_path.exists():
            raise RuntimeError(f"run {run_id} has no finished epoch to resume from")
        total = epochs or row["epochs"]
        if row["status"] == "done" and total <= row["epochs_done"]:
            raise RuntimeError(f"run {run_id} already finished its {row['epochs']} epochs; ask for more epochs")
        job = Job(self.ws, run_id, total, resume=True, extra_epochs=epochs)
        self.ws.update_run(run_id, status="queued", epochs=total, error=None)
        with self._lock:
            self._enqueue(job)
        return run_id

    def _enqueue(self, job: Job) -> None:
        self._jobs[job.run.id] = job
        self._queue.append(job)
        self._wake.notify_all()

    def stop(self, run_id: str) -> bool:
        """Ask a job to stop: a queued one never starts; a running one stops within one batch."""
        with self._lock:
            job = self._jobs.get(run_id)
        if job is None or not job.snapshot().active:
            return False
        job.stop_event.set()
        snap = job.snapshot()
        if snap.status == "running":
            job._set(status="stopping")
            self.ws.update_run(run_id, status="stopping")
        return True

    def snapshot(self, run_id: str) -> JobSnapshot | None:
        with self._lock:
            job = self._jobs.get(run_id)
        if job is not None:
            return job.snapshot()
        row = self.ws.run_row(run_id)
        if row is None:
            return None
        run = self.ws.run(run_id)
        log = []
        if run.log_path.exists():
            log = run.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-LOG_LINES:]
        history = run.history()
        return JobSnapshot(run_id=run_id, status=row["status"], epoch=row["epochs_done"], epochs=row["epochs"],
                           history=history, log=log, error=row["error"], created=row["created"],
                           started=row["started"], finished=row["finished"], test_acc=row["test_acc"])

    def active(self) -> JobSnapshot | None:
        """The running job, else the next queued one, else None."""
        with self._lock:
            jobs = list(self._jobs.values())
        snaps = [j.snapshot() for j in jobs]
        running = [s for s in snaps if s.status in ("running", "stopping")]
        queued = [s for s in snaps if s.status == "queued"]
        return (running or queued or [None])[0]

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
                job = self._queue.popleft()
            job.execute()
