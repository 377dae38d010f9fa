"""The hot folder: inspection cameras write images into a folder; each new image is predicted once, after its file
is complete, and its row appended to a CSV and to the workspace.

- Complete: a file whose size and modification time stayed the same for `settle_s` (a camera still writing it
  changes one of them), or one renamed into place (the rename is atomic: it is stable at once). Hidden files and
  names ending .tmp, .part, .partial or .crdownload are a writer's work in progress and are never read.
- Once: a file is known by its name, size and modification time in the workspace (`watch_files`); the row is
  recorded there before it is appended to the CSV, and a row recorded but not yet in the CSV (a kill between the two)
  is appended at the next start. Killed and restarted, the watcher predicts nothing twice and misses nothing written
  meanwhile (every file not yet recorded is new).
- An unreadable file (not an image, truncated) gets a row with the reason and no prediction, and is not retried.
- The images the rule sends to review are linked (symlinks) into workspace/review/<folder>/ and listed in
  `watch_files` (verdict "review"), which the Label page shows as a queue.
- File events come from watchdog where the file system gives them (they wake the loop at once); polling every
  `interval_s` always runs too, and alone where events are not available (network shares, some containers).
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
import threading
import time
from pathlib import Path

from core.data.images import IMAGE_EXTENSIONS
from core.workspace.store import Workspace, connect

SCHEMA = """
CREATE TABLE IF NOT EXISTS watch_files (
    folder TEXT NOT NULL,            -- the watched folder, resolved
    name TEXT NOT NULL,              -- the file's path inside it
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    at REAL NOT NULL,                -- when it was predicted
    model TEXT NOT NULL,             -- the release or run that predicted it
    label TEXT,                      -- the likeliest class (NULL: unreadable)
    verdict TEXT,                    -- the rule's pass / fail / review, or the class; NULL without a rule
    probs TEXT,                      -- JSON {class: p}
    error TEXT,                      -- why it could not be read
    in_csv INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (folder, name, size, mtime_ns)
);
"""
WORK_IN_PROGRESS = (".tmp", ".part", ".partial", ".crdownload")


def review_queue(ws: Workspace, limit: int = 500) -> list[dict]:
    """The hot folders' images the rule sent to a person, newest first: {"path", "link", "at", "model", "label",
    "probs"} (link: its symlink under workspace/review/, None if the image is gone)."""
    con = connect(ws.db_path, SCHEMA)  # a workspace that never watched a folder: an empty queue
    try:
        rows = [dict(r) for r in con.execute("SELECT * FROM watch_files WHERE verdict = 'review' ORDER BY at DESC "
                                             "LIMIT ?", (limit,))]
    finally:
        con.close()
    for r in rows:
        r["path"] = os.path.join(r["folder"], r["name"])
        r["probs"] = json.loads(r["probs"]) if r["probs"] else {}
        link = _review_link(ws, r["folder"], r["name"])
        r["link"] = str(link) if link.exists() else None
    return rows


def _review_link(ws: Workspace, folder: str, name: str) -> Path:
    tag = Path(folder).name + "-" + hashlib.sha1(folder.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return ws.root / "review" / tag / name


class HotFolder:
    """One watched folder, its model (anything with `predict(paths)` and `classes`, like core.deploy.predict's
    Predictor or portable's OnnxPredictor), its CSV and the workspace's record."""

    def __init__(self, ws: Workspace, folder: str | Path, predictor, model_name: str, out_csv: str | Path,
                 settle_s: float = 1.0, log=None, clock=time.monotonic):
        self.ws, self.predictor, self.model_name = ws, predictor, model_name
        self.folder = Path(folder).expanduser().resolve()
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder")
        self.out_csv, self.settle_s, self.clock = Path(out_csv).expanduser(), settle_s, clock
        self.log = log or (lambda line: print(line, file=sys.stderr))
        self.classes = list(predictor.classes)
        connect(ws.db_path, SCHEMA).close()  # once here, not on each image's writes
        self._check_header()
        self._seen_stat: dict[str, tuple[int, int, float]] = {}  # waiting to settle: name -> (size, mtime_ns, since)
        self.renamed: set[str] = set()  # paths a file event saw renamed into place
        self._catch_up_csv()

    # --- the record ------------------------------------------------------------------------------------
    def _done(self) -> set[tuple[str, int, int]]:
        con = connect(self.ws.db_path)
        try:
            return {(r["name"], r["size"], r["mtime_ns"]) for r in con.execute(
                "SELECT name, size, mtime_ns FROM watch_files WHERE folder = ?", (str(self.folder),))}
        finally:
            con.close()

    def _catch_up_csv(self) -> None:
        """Rows recorded in the workspace but not in the CSV (killed between the two): appended now, once."""
        con = connect(self.ws.db_path)
        try:
            pending = [dict(r) for r in con.execute("SELECT * FROM watch_files WHERE folder = ? AND in_csv = 0 "
                                                    "ORDER BY at", (str(self.folder),))]
        finally:
            con.close()
        if not pending:
            return
        in_csv = set()
        if self.out_csv.exists():
            with open(self.out_csv, newline="", encoding="utf-8", errors="surrogateescape") as fh:
                in_csv = {(r["file"], r["size"], r["mtime_ns"]) for r in csv.DictReader(fh)}
        for row in pending:
            if (row["name"], str(row["size"]), str(row["mtime_ns"])) not in in_csv:
                self._append_csv(row)
            self._mark_in_csv(row)

    def _check_header(self) -> None:
        """A CSV written before with other columns (another model's classes) is not appended to: its rows would
        land under the wrong probabilities."""
        if not self.out_csv.exists() or self.out_csv.stat().st_size == 0:
            return
        with open(self.out_csv, newline="", encoding="utf-8", errors="surrogateescape") as fh:
            have = next(csv.reader(fh), [])
        if have != self._header():
            raise ValueError(f"{self.out_csv} holds rows for other columns ({', '.join(have[8:]) or 'none'}; this "
                             f"model has {', '.join('p_' + c for c in self.classes)}): give another --out")

    def _header(self) -> list[str]:
        return ["time", "file", "size", "mtime_ns", "model", "class", "decision", "error"] + [f"p_{c}" for c in
                                                                                               self.classes]

    def _append_csv(self, row: dict) -> None:
        new = not self.out_csv.exists() or self.out_csv.stat().st_size == 0
        self.out_csv.parent.mkdir(parents=True, exist_ok=True)
        probs = json.loads(row["probs"]) if row["probs"] else {}
        with open(self.out_csv, "a", newline="", encoding="utf-8", errors="surrogateescape") as fh:
            w = csv.writer(fh)
            if new:
                w.writerow(self._header())
            w.writerow([time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(row["at"])), row["name"], row["size"],
                        row["mtime_ns"], row["model"], row["label"] or "", row["verdict"] or "", row["error"] or ""]
                       + [f"{probs[c]:.6f}" if c in probs else "" for c in self.classes])
            fh.flush()
            os.fsync(fh.fileno())

    def _mark_in_csv(self, row: dict) -> None:
        con = connect(self.ws.db_path)
        try:
            with con:
                con.execute("UPDATE watch_files SET in_csv = 1 WHERE folder = ? AND name = ? AND size = ? AND "
                            "mtime_ns = ?", (str(self.folder), row["name"], row["size"], row["mtime_ns"]))
        finally:
            con.close()

    # --- one pass ---------------------------------------------------------------------------------------
    def ready(self) -> list[tuple[str, int, int]]:
        """(name, size, mtime_ns) of the images that are complete and not yet predicted, oldest first."""
        now, done, out, present = self.clock(), self._done(), [], set()
        for path in sorted(self.folder.rglob("*")):
            name = path.relative_to(self.folder).as_posix()
            if any(part.startswith(".") for part in Path(name).parts) or name.lower().endswith(WORK_IN_PROGRESS):
                continue
            if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
                continue
            try:
                st = path.stat()
            except OSError:
                continue  # gone between the listing and now
            present.add(name)
            key = (name, st.st_size, st.st_mtime_ns)
            if key in done:
                continue
            before = self._seen_stat.get(name)
            renamed = str(path) in self.renamed  # moved into place: complete at once
            if not renamed and (before is None or before[:2] != key[1:]):
                self._seen_stat[name] = (st.st_size, st.st_mtime_ns, now)  # new, or still changing: wait
                if self.settle_s > 0:
                    continue
            elif not renamed and now - before[2] < self.settle_s:
                continue
            out.append(key)
        self._seen_stat = {k: v for k, v in self._seen_stat.items() if k in present}
        return sorted(out, key=lambda k: (k[2], k[0]))

    def process(self) -> int:
        """Predict every ready image once; returns how many."""
        ready = self.ready()
        for start in range(0, len(ready), 16):
            chunk = ready[start:start + 16]
            results = self.predictor.predict([str(self.folder / name) for name, _, _ in chunk], top_k=1)
            for (name, size, mtime), r in zip(chunk, results):
                self._record(name, size, mtime, r)
                self._seen_stat.pop(name, None)
                self.renamed.discard(str(self.folder / name))
        return len(ready)

    def _record(self, name: str, size: int, mtime: int, result: dict) -> None:
        row = {"folder": str(self.folder), "name": name, "size": size, "mtime_ns": mtime, "at": time.time(),
               "model": self.model_name, "label": None, "verdict": None, "probs": None, "error": None}
        if "error" in result:
            row["error"] = result["error"]
            self.log(f"skipped {name}: {result['error']}")
        else:
            row["label"] = result["top"][0]["label"]
            row["probs"] = json.dumps(result["probs"])
            row["verdict"] = result["decision"]["verdict"] if "decision" in result else None
        con = connect(self.ws.db_path)
        try:
            with con:
                con.execute("INSERT OR IGNORE INTO watch_files (folder, name, size, mtime_ns, at, model, label, verdict, "
                            "probs, error) VALUES (:folder, :name, :size, :mtime_ns, :at, :model, :label, :verdict, "
                            ":probs, :error)", row)
        finally:
            con.close()
        self._append_csv(row)
        self._mark_in_csv(row)
        if row["verdict"] == "review":
            link = _review_link(self.ws, str(self.folder), name)
            link.parent.mkdir(parents=True, exist_ok=True)
            try:
                link.unlink(missing_ok=True)
                link.symlink_to(self.folder / name)
            except OSError as exc:  # a file system without symlinks: the queue lists the path all the same
                self.log(f"could not link {name} into the review queue: {exc}")

    # --- the loop ---------------------------------------------------------------------------------------
    def run(self, interval_s: float = 1.0, stop: threading.Event | None = None, once: bool = False) -> None:
        """Until `stop` is set (or after one pass with `once`): process, then wait for a file event or the interval."""
        stop = stop or threading.Event()
        wake = threading.Event()
        observer = None if once else _observe(self.folder, wake, self.renamed, self.log)
        try:
            while True:
                n = self.process()
                if n:
                    self.log(f"predicted {n} image(s) from {self.folder}")
                if once and not self._seen_stat:
                    return
                wake.wait(min(interval_s, self.settle_s) if self._seen_stat else interval_s)
                wake.clear()
                if stop.is_set():
                    return
        finally:
            if observer is not None:
                observer.stop()


def _observe(folder: Path, wake: threading.Event, renamed: set, log):
    """A watchdog observer that wakes the loop on any change in the folder and notes the files renamed into place,
    or None (polling alone)."""
    try:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
    except ImportError:
        log("watchdog is not installed: polling")
        return None

    class Wake(FileSystemEventHandler):
        def on_any_event(self, event):
            if event.event_type == "moved" and not event.is_directory:
                renamed.add(os.fsdecode(event.dest_path))
            wake.set()

    try:
        observer = Observer()
        observer.schedule(Wake(), str(folder), recursive=True)
        observer.start()
        return observer
    except (OSError, RuntimeError) as exc:  # inotify watches used up, a file system without events
        log(f"no file events here ({exc}): polling")
        return None
