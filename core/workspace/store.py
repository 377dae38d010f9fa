"""The workspace: one folder per run, and a SQLite index of runs and registered datasets.

    workspace/
      studio.db            runs and datasets (SQLite, WAL)
      runs/<run id>/       config.json, split.json, metrics.csv, log.txt, best.pt/.json,
                           last.pt/.json, eval.json, predictions.csv, golden.json/.csv
      cache/               memory-mapped decoded images for sets larger than the memory cache
      datasets/            imported zips, extracted

Default location ./workspace; override with --workspace DIR or STUDIO_WORKSPACE.
"""
from __future__ import annotations

import csv
import json
import os
import secrets
import shutil
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from core.errors import UserError
from core.workspace.files import write_atomic, write_json_atomic

ACTIVE = ("queued", "running", "stopping")


SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    dataset TEXT NOT NULL,
    arch TEXT NOT NULL,
    weights TEXT NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    epochs INTEGER NOT NULL,
    epochs_done INTEGER NOT NULL DEFAULT 0,
    best_val_acc REAL,
    test_acc REAL,
    pid INTEGER,
    error TEXT,
    label_version INTEGER,
    pid_started REAL,                -- when that process started: a pid alone can be reused (a container's PID 1)
    golden_acc REAL,                 -- accuracy on the dataset's golden set (core/data/golden.py) at its
    golden_version INTEGER           -- golden_version: runs compare on the same images
);
CREATE TABLE IF NOT EXISTS datasets (
    name TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    added REAL NOT NULL
);
"""

RUN_COLUMNS = ("id", "dataset", "arch", "weights", "status", "created", "started", "finished", "epochs",
               "epochs_done", "best_val_acc", "test_acc", "pid", "error", "label_version",
               "pid_started", "golden_acc", "golden_version")
ADDED_COLUMNS = {"pid_started": "REAL", "golden_acc": "REAL", "golden_version": "INTEGER"}  # on older workspaces

METRIC_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_s",
                 "avg_val_loss", "avg_val_acc",  # the averaged weights' (ema, swa), else empty
                 "train_size"]  # the side the epoch trained at: below the run's size in progressive resizing's epochs


class NameTaken(UserError):
    """A dataset name already registered for another source."""


def connect(db_path: str | Path, schema: str | None = None) -> sqlite3.Connection:
    """A connection to the workspace's SQLite file as the modules that own tables in it open one: a busy timeout
    (several sessions and processes share the file), rows by column name, WAL; `schema` (CREATE ... IF NOT EXISTS)
    is run first when given. The caller closes it."""
    con = sqlite3.connect(db_path, timeout=30)
    con.row_factory = sqlite3.Row
    con.execute("PRAGMA journal_mode=WAL")
    if schema:
        con.executescript(schema)
    return con


def default_workspace() -> Path:
    return Path(os.environ.get("STUDIO_WORKSPACE", "workspace")).expanduser()


def process_started(pid: int | None = None) -> float | None:
    """When a process (this one by default) started, in seconds since the epoch; None when there is none."""
    import psutil
    try:
        return psutil.Process(pid or os.getpid()).create_time()
    except psutil.Error:
        return None


def pid_alive(pid: int | None, started: float | None = None) -> bool:
    """Whether the process that recorded itself as (pid, started) still runs. A pid alone is not enough: a
    container's studio is PID 1 on every start, and any pid is reused in time; with its start time, a new process
    under an old pid is told apart. (started None: rows written before it was recorded, the pid alone.)"""
    import psutil
    if not pid:
        return False
    try:
        created = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # someone else's process: it exists
        return True
    return started is None or abs(created - started) < 1.0


def is_this_process(pid: int | None, started: float | None) -> bool:
    return pid == os.getpid() and (started is None or abs((process_started() or 0) - started) < 1.0)


@dataclass
class Run:
    id: str
    dir: Path

    @property
    def config_path(self) -> Path: return self.dir / "config.json"
    @property
    def split_path(self) -> Path: return self.dir / "split.json"
    @property
    def metrics_path(self) -> Path: return self.dir / "metrics.csv"
    @property
    def log_path(self) -> Path: return self.dir / "log.txt"
    @property
    def best_path(self) -> Path: return self.dir / "best.pt"
    @property
    def last_path(self) -> Path: return self.dir / "last.pt"
    @property
    def eval_path(self) -> Path: return self.dir / "eval.json"
    @property
    def predictions_path(self) -> Path: return self.dir / "predictions.csv"
    @property
    def skipped_path(self) -> Path: return self.dir / "skipped.json"
    @property
    def pretrained_path(self) -> Path: return self.dir / "pretrained.pt"    # self-supervised backbone (pretrain.py)
    @property
    def scores_path(self) -> Path: return self.dir / "scores.npz"          # raw val/test probabilities (decide.py)
    @property
    def calibration_path(self) -> Path: return self.dir / "calibration.json"  # the fitted temperature (decide.py)
    @property
    def rule_path(self) -> Path: return self.dir / "rule.json"              # the chosen decision rule (decide.py)
    @property
    def golden_path(self) -> Path: return self.dir / "golden.json"          # scores on the golden set (evaluate.py)
    @property
    def golden_predictions_path(self) -> Path: return self.dir / "golden.csv"  # per golden image, by SHA-256

    def config(self):
        from core.config import TrainConfig
        return TrainConfig.from_dict(json.loads(self.config_path.read_text()))

    def split(self) -> dict:
        return json.loads(self.split_path.read_text())

    def history(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        with open(self.metrics_path, newline="") as fh:
            return [{k: (float(v) if k != "epoch" else int(v)) for k, v in row.items() if v != ""}
                    for row in csv.DictReader(fh)]

    def write_history(self, rows: list[dict]) -> None:
        def write(tmp):
            with open(tmp, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=METRIC_FIELDS, extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)
        write_atomic(self.metrics_path, write)

    def write_config(self, cfg) -> None:
        write_json_atomic(self.config_path, cfg.to_dict())

    def skipped(self) -> list[tuple[str, str]]:
        """Every file this run left out, with the reason: at the scan (not an image, empty...) and at
        decoding (truncated...)."""
        if not self.skipped_path.exists():
            return []
        return [(p, r) for p, r in json.loads(self.skipped_path.read_text())]

    def write_skipped(self, skipped) -> None:
        known = self.skipped()
        seen = {p for p, _ in known}
        rows = known + [(p, r) for p, r in skipped if p not in seen]
        self.skipped_path.write_text(json.dumps([list(r) for r in rows]))

    def evaluation(self) -> dict | None:
        if not self.eval_path.exists():
            return None
        return json.loads(self.eval_path.read_text())

    def calibration(self) -> dict | None:
        if not self.calibration_path.exists():
            return None
        return json.loads(self.calibration_path.read_text())

    def temperature(self) -> float:
        """The temperature every probability of this run is shown with (1.0 until it has been calibrated)."""
        cal = self.calibration()
        return float(cal["temperature"]) if cal else 1.0

    def log(self, line: str) -> None:
        stamp = datetime.now().strftime("%H:%M:%S")
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(f"{stamp} {line}\n")


class Workspace:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_workspace()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.runs_dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise OSError(f"cannot use workspace {self.root}: {exc.strerror or exc}") from None
        for attempt in range(10):  # processes opening a new workspace at once (the ranks of a run) race here
            try:
                with self._db() as db:
                    db.executescript(SCHEMA)
                    have = {r[1] for r in db.execute("PRAGMA table_info(runs)")}
                    for column, kind in ADDED_COLUMNS.items():  # a workspace from before them
                        if column not in have:
                            db.execute(f"ALTER TABLE runs ADD COLUMN {column} {kind}")
                break
            except sqlite3.OperationalError:
                if attempt == 9:
                    raise
                time.sleep(0.1 * (attempt + 1))

    @property
    def runs_dir(self) -> Path: return self.root / "runs"
    @property
    def cache_dir(self) -> Path: return self.root / "cache"
    @property
    def datasets_dir(self) -> Path: return self.root / "datasets"
    @property
    def db_path(self) -> Path: return self.root / "studio.db"

    @contextmanager
    def _db(self):
        # Short transactions with a busy timeout: several sessions and processes share this file.
        for attempt in range(5):
            try:
                con = sqlite3.connect(self.db_path, timeout=30)
                break
            except sqlite3.OperationalError:
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
        try:
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA journal_mode=WAL")
            with con:
                yield con
        finally:
            con.close()

    # --- runs ---------------------------------------------------------------------------------------
    def new_run_id(self) -> str:
        return datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)

    def create_run(self, cfg, dataset_name: str, run_id: str | None = None) -> Run:
        run_id = run_id or self.new_run_id()
        run = Run(run_id, self.runs_dir / run_id)
        run.dir.mkdir(parents=True, exist_ok=False)
        run.write_config(cfg)
        with self._db() as db:
            db.execute(
                "INSERT INTO runs (id, dataset, arch, weights, status, created, epochs, pid, pid_started) "
                "VALUES (?,?,?,?,?,?,?,?,?)", (run_id, dataset_name, cfg.arch, str(cfg.weights), "queued",
                                               time.time(), cfg.epochs, os.getpid(), process_started()))
        return run

    def run(self, run_id: str) -> Run:
        if not run_id or "/" in run_id or "\\" in run_id or run_id.startswith("."):
            raise KeyError(f"no run {run_id!r}")
        run = Run(run_id, self.runs_dir / run_id)
        if not run.dir.is_dir():
            raise KeyError(f"no run {run_id!r} in {self.root}")
        return run

    def update_run(self, run_id: str, expect_status: str | None = None, **fields) -> bool:
        """Set the row's fields; with expect_status, only while the row still has that status (compare and set).
        Returns whether the row changed. Only core/runs/life.py calls this: it owns a run's status and scores."""
        bad = set(fields) - set(RUN_COLUMNS)
        if bad:
            raise ValueError(f"unknown run fields {bad}")
        sets = ", ".join(f"{k} = ?" for k in fields)
        where, args = "id = ?", [run_id]
        if expect_status is not None:
            where, args = "id = ? AND status = ?", [run_id, expect_status]
        with self._db() as db:
            return db.execute(f"UPDATE runs SET {sets} WHERE {where}", (*fields.values(), *args)).rowcount > 0

    def run_row(self, run_id: str) -> dict | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return dict(row) if row else None

    def list_runs(self) -> list[dict]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM runs ORDER BY created DESC").fetchall()
        return [dict(r) for r in rows]

    def delete_run(self, run_id: str) -> None:
        run = self.run(run_id)
        row = self.run_row(run_id)
        if row and row["status"] in ACTIVE and pid_alive(row["pid"], row["pid_started"]):
            raise RuntimeError(f"run {run_id} is {row['status']}: stop it before deleting it")
        shutil.rmtree(run.dir)
        with self._db() as db:
            db.execute("DELETE FROM runs WHERE id = ?", (run_id,))

    # --- datasets -----------------------------------------------------------------------------------
    def register_dataset(self, name: str, source: str, replace: bool = False) -> None:
        """Register a dataset under a name. A name that already names another source is refused (NameTaken) unless
        replace: registering must never silently repoint a dataset that runs and labels refer to."""
        with self._db() as db:
            row = db.execute("SELECT source FROM datasets WHERE name = ?", (name,)).fetchone()
            if row is not None and row["source"] != str(source) and not replace:
                raise NameTaken(f"a dataset named {name!r} is registered already (from {row['source']}); "
                                "choose another name, or remove that one first")
            db.execute("INSERT OR REPLACE INTO datasets (name, source, added) VALUES (?,?,?)",
                       (name, str(source), time.time()))

    def list_datasets(self) -> list[dict]:
        with self._db() as db:
            return [dict(r) for r in db.execute("SELECT * FROM datasets ORDER BY added DESC").fetchall()]

    def remove_dataset(self, name: str) -> None:
        with self._db() as db:
            db.execute("DELETE FROM datasets WHERE name = ?", (name,))
