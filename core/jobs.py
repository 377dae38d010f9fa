"""Background training jobs: one worker thread runs one job at a time; more are queued.

Pages (or any caller) only submit, stop, and read snapshots. The worker never touches any UI. A job's status
is its run's status, owned by core/runs.py; a snapshot adds the live progress (batch, speed, ETA, log).
Importing this module does not import torch: the studio starts fast and torch loads with the first job.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

from . import runs
from .config import TrainConfig
from .storage import ACTIVE, Workspace

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


def _train(ws: Workspace, run, reporter, resume: bool) -> dict:
    from .train import fit  # torch loads here, on the worker thread, with the first job
    return fit(ws, run, reporter=reporter, resume=resume)


class Job(runs.Reporter):
    def __init__(self, ws: Workspace, run_id: str, epochs: int, work):
        self.ws = ws
        self.work = work  # work(ws, run, reporter) -> {"status": ...}
        self.run = ws.run(run_id)
        self.stop_event = threading.Event()
        self.done_event = threading.Event()
        self._lock = threading.Lock()
        self._log: deque[str] = deque(maxlen=LOG_LINES)
        self._snap = JobSnapshot(run_id=run_id, status="queued", epochs=epochs, history=self.run.history())
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
        """Live progress from the job, status and times from the run's owner."""
        row = self.ws.run_row(self.run.id) or {}
        with self._lock:
            snap = replace(self._snap, history=list(self._snap.history), log=list(self._log))
        snap.status = row.get("status", snap.status)
        snap.error, snap.created = row.get("error"), row.get("created", 0.0)
        snap.started, snap.finished, snap.test_acc = row.get("started"), row.get("finished"), row.get("test_acc")
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
            runs.execute(self.ws, self.run.id, lambda: self.work(self.ws, self.run, self), self)
        finally:
            self.done_event.set()


class JobManager:
    """Shared by every page and session of one process (the studio keeps one in st.cache_resource)."""

    def __init__(self, ws: Workspace):
        self.ws = ws
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
        return self._submit(cfg, request_id, lambda: runs.prepare_run(self.ws, cfg, label_version=label_version),
                            cfg.epochs, lambda ws, run, rep: _train(ws, run, rep, resume=False))

    def submit_crossval(self, cfg: TrainConfig, folds: int = 4, request_id: str | None = None) -> str:
        """Queue k-fold cross-validation (out-of-sample probabilities for finding label errors)."""
        from .curation import as_crossval, crossval  # torch loads with the first job, not at start-up
        cfg = as_crossval(cfg, folds)
        return self._submit(cfg, request_id, lambda: runs.prepare_run(self.ws, cfg), cfg.epochs * folds,
                            lambda ws, run, rep: crossval(ws, run, rep, folds=folds))

    def submit_learning_curve(self, run_id: str, epochs: int | None = None, request_id: str | None = None) -> str:
        """Queue a learning curve of run `run_id`: its recipe on 25/50/75/100% of its training part (core/learning_curve.py).
        `epochs`: fewer epochs per fraction than the run's, to keep it short on a CPU."""
        from .learning_curve import as_learning_curve, learning_curve
        cfg = as_learning_curve(self.ws.run(run_id).config(), run_id, epochs=epochs)
        return self._submit(cfg, request_id, lambda: runs.prepare_derived(self.ws, run_id, cfg),
                            cfg.epochs * len(cfg.extra["fractions"]), learning_curve)

    def _submit(self, cfg: TrainConfig, request_id: str | None, prepare, epochs: int, work) -> str:
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
            self._enqueue(Job(self.ws, run.id, epochs, work))
        if isinstance(pending, threading.Event):
            pending.set()
        return run.id

    def resume(self, run_id: str, epochs: int | None = None) -> str:
        """Queue a stopped, failed or interrupted run to continue, or a done one to train on to `epochs`
        (core/runs.py's prepare_resume says how). RunStateError or KeyError say why not."""
        with self._lock:
            job = self._jobs.get(run_id)
            if job is not None and not job.done_event.is_set():
                raise runs.RunStateError(f"run {run_id} is already {job.snapshot().status}")
        run = runs.prepare_resume(self.ws, run_id, epochs)
        job = Job(self.ws, run_id, run.config().epochs, lambda ws, r, rep: _train(ws, r, rep, resume=True))
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
        if job is None or job.done_event.is_set():
            return False
        job.stop_event.set()
        try:
            runs.transition(self.ws, run_id, "stopping")
        except runs.RunStateError:
            pass  # queued (it will never start), or already ending
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
        return JobSnapshot(run_id=run_id, status=row["status"], epoch=row["epochs_done"], epochs=row["epochs"],
                           history=run.history(), log=log, error=row["error"], created=row["created"],
                           started=row["started"], finished=row["finished"], test_acc=row["test_acc"])

    def active(self) -> JobSnapshot | None:
        """The running job, else the next queued one, else None."""
        with self._lock:
            jobs = [j for j in self._jobs.values() if not j.done_event.is_set()]
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
