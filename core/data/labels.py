"""The label store: corrected labels and exclusions in the workspace's SQLite database.

A dataset's effective labels are its folder/CSV labels overridden by this store. Every change is appended to
a history (old, new, when, source, who) and can be undone by the person who made it, back to exactly what was
stored before (including "no override", so a later edit of the folder or CSV is seen again); image files are
never moved or modified. The label
version of a dataset is the id of its latest history entry: each run records the version it trained on.

Writes are short IMMEDIATE transactions with a busy timeout and a retry, so several sessions (or processes)
labeling at once lose nothing.
"""
from __future__ import annotations

import sqlite3
import time
from contextlib import contextmanager
from dataclasses import replace

from core.data.sources import Dataset, Sample

SOURCES = ("folder", "manual", "suggestion", "import", "undo")

SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    dataset TEXT NOT NULL,
    path TEXT NOT NULL,
    label TEXT,                      -- NULL: no override of the label (maybe only excluded)
    excluded INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL,
    PRIMARY KEY (dataset, path)
);
CREATE TABLE IF NOT EXISTS label_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset TEXT NOT NULL,
    path TEXT NOT NULL,
    old_label TEXT,
    new_label TEXT,
    old_excluded INTEGER NOT NULL,
    new_excluded INTEGER NOT NULL,
    at REAL NOT NULL,
    source TEXT NOT NULL,
    batch TEXT NOT NULL,             -- one user action (several images assigned at once) undoes together
    undone INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS label_history_dataset ON label_history (dataset, id);
"""
# Added later (ALTER TABLE on an older workspace): who made a change, and the labels row exactly as it was before it
# (had_row 0: there was no override at all; stored_label: the row's label, NULL for "no label override").
HISTORY_COLUMNS = {"actor": "TEXT", "had_row": "INTEGER", "stored_label": "TEXT", "new_stored_label": "TEXT"}


class LabelStore:
    def __init__(self, ws):
        self.db_path = ws.db_path
        con = sqlite3.connect(self.db_path, timeout=30)
        try:
            con.executescript(SCHEMA)
            have = {r[1] for r in con.execute("PRAGMA table_info(label_history)")}
            for column, kind in HISTORY_COLUMNS.items():
                if column not in have:
                    try:
                        con.execute(f"ALTER TABLE label_history ADD COLUMN {column} {kind}")
                    except sqlite3.OperationalError:  # another process added it a moment ago
                        pass
            con.commit()
        finally:
            con.close()

    @contextmanager
    def _tx(self, retries: int = 8):
        """One IMMEDIATE transaction (the write lock is taken up front, so read-then-write cannot race)."""
        for attempt in range(retries):
            con = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
            con.row_factory = sqlite3.Row
            try:
                con.execute("PRAGMA journal_mode=WAL")
                con.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError:
                con.close()
                if attempt == retries - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))
                continue
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
            finally:
                con.close()
            return

    # --- writing ------------------------------------------------------------------------------------
    def set_labels(self, dataset: str, changes: dict[str, str | None], source: str = "manual",
                   original: dict[str, str | None] | None = None, excluded: bool | None = None,
                   actor: str | None = None) -> int:
        """Set the label (and/or the excluded flag) of several images in one action by `actor` (who: a signed-in
        user, or one browser session). `original` gives each image's folder label, recorded as the old label the
        first time it changes. Returns the new version."""
        if source not in SOURCES:
            raise ValueError(f"unknown label source {source!r}")
        original = original or {}
        batch = f"{time.time():.6f}-{id(changes)}"
        now = time.time()
        with self._tx() as con:
            for path, new_label in changes.items():
                row = con.execute("SELECT label, excluded FROM labels WHERE dataset = ? AND path = ?",
                                  (dataset, path)).fetchone()
                old_label = row["label"] if row and row["label"] is not None else original.get(path)
                old_excl = int(row["excluded"]) if row else 0
                label = new_label if new_label is not None else (row["label"] if row else None)
                new_excl = old_excl if excluded is None else int(excluded)
                if (label if label is not None else original.get(path)) == old_label and new_excl == old_excl:
                    continue  # nothing changes: no history entry
                con.execute("INSERT INTO labels (dataset, path, label, excluded, updated) VALUES (?,?,?,?,?) "
                            "ON CONFLICT (dataset, path) DO UPDATE SET label = excluded.label, "
                            "excluded = excluded.excluded, updated = excluded.updated",
                            (dataset, path, label, new_excl, now))
                con.execute("INSERT INTO label_history (dataset, path, old_label, new_label, old_excluded, "
                            "new_excluded, at, source, batch, actor, had_row, stored_label, new_stored_label) "
                            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                            (dataset, path, old_label, label if label is not None else old_label, old_excl,
                             new_excl, now, source, batch, actor, int(row is not None),
                             row["label"] if row else None, label))
            return _version(con, dataset)

    def set_label(self, dataset: str, path: str, label: str, source: str = "manual",
                  original: str | None = None, actor: str | None = None) -> int:
        return self.set_labels(dataset, {path: label}, source, {path: original} if original else None, actor=actor)

    def exclude(self, dataset: str, paths: list[str], excluded: bool = True, source: str = "manual",
                actor: str | None = None) -> int:
        return self.set_labels(dataset, {p: None for p in paths}, source, excluded=excluded, actor=actor)

    def undo(self, dataset: str, actor: str | None = None) -> list[dict]:
        """Revert the latest action of `actor` (all images it changed) to exactly what was stored before it: the
        override it replaced, or no override at all. An image someone changed since is left as they made it and
        comes back with "kept": True. Returns the action's entries ("kept" False for the reverted ones)."""
        with self._tx() as con:
            last = con.execute("SELECT batch FROM label_history WHERE dataset = ? AND undone = 0 AND source != 'undo' "
                               "AND actor IS ? ORDER BY id DESC LIMIT 1", (dataset, actor)).fetchone()
            if last is None:
                return []
            entries = [dict(r) for r in con.execute(
                "SELECT * FROM label_history WHERE dataset = ? AND batch = ? ORDER BY id DESC",
                (dataset, last["batch"])).fetchall()]
            now = time.time()
            for e in entries:
                row = con.execute("SELECT label, excluded FROM labels WHERE dataset = ? AND path = ?",
                                  (dataset, e["path"])).fetchone()
                exact = e["had_row"] is not None  # recorded since the exact state was kept
                expected = (e["new_stored_label"], e["new_excluded"]) if exact else None
                e["kept"] = bool(exact and (row is None or (row["label"], row["excluded"]) != expected))
                if e["kept"]:
                    continue  # changed by someone since: theirs stands
                if exact and not e["had_row"]:
                    con.execute("DELETE FROM labels WHERE dataset = ? AND path = ?", (dataset, e["path"]))
                else:
                    con.execute("UPDATE labels SET label = ?, excluded = ?, updated = ? WHERE dataset = ? AND path = ?",
                                (e["stored_label"] if exact else e["old_label"], e["old_excluded"], now, dataset,
                                 e["path"]))
                con.execute("INSERT INTO label_history (dataset, path, old_label, new_label, old_excluded, "
                            "new_excluded, at, source, batch, undone, actor) VALUES (?,?,?,?,?,?,?,?,?,1,?)",
                            (dataset, e["path"], e["new_label"], e["old_label"], e["new_excluded"],
                             e["old_excluded"], now, "undo", f"undo-{e['batch']}", actor))
            con.execute("UPDATE label_history SET undone = 1 WHERE dataset = ? AND batch = ?",
                        (dataset, last["batch"]))
            return entries

    # --- reading ------------------------------------------------------------------------------------
    def overrides(self, dataset: str) -> dict[str, tuple[str | None, bool]]:
        with self._tx() as con:
            rows = con.execute("SELECT path, label, excluded FROM labels WHERE dataset = ?", (dataset,)).fetchall()
        return {r["path"]: (r["label"], bool(r["excluded"])) for r in rows}

    def history(self, dataset: str, path: str | None = None, limit: int = 200) -> list[dict]:
        q = "SELECT * FROM label_history WHERE dataset = ?"
        args: list = [dataset]
        if path is not None:
            q += " AND path = ?"
            args.append(path)
        with self._tx() as con:
            return [dict(r) for r in con.execute(q + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()]

    def version(self, dataset: str) -> int:
        with self._tx() as con:
            return _version(con, dataset)

    # --- effective labels ---------------------------------------------------------------------------
    def apply(self, ds: Dataset) -> Dataset:
        """The dataset with the store's labels: relabeled images move class, excluded ones are left out,
        labeled images from the unlabeled pool join, and new class names become classes."""
        over = self.overrides(ds.source)
        if not over:
            return ds
        entries = []  # (path, label name, group, given split, origin)
        split_of = {}
        for part, idx in ds.given_splits.items():
            for i in idx:
                split_of[i] = part
        for i, s in enumerate(ds.samples):
            label, excl = over.get(s.path, (None, False))
            if excl:
                continue
            entries.append((s.path, label or ds.classes[s.label], s.group, split_of.get(i), s.origin))
        for path in ds.unlabeled:
            label, excl = over.get(path, (None, False))
            if label and not excl:
                entries.append((path, label, "", "train" if ds.given_splits else None, ""))
        # Classes: every name still in use (the dataset's and new ones from the store), sorted.
        classes = sorted({e[1] for e in entries}) or ds.classes
        index = {c: i for i, c in enumerate(classes)}
        samples, given = [], {}
        for path, label, group, part, origin in entries:
            if part:
                given.setdefault(part, []).append(len(samples))
            samples.append(Sample(path=path, label=index[label], group=group, origin=origin))
        unlabeled = [p for p in ds.unlabeled if p not in over or not (over[p][0] or over[p][1])]
        return replace(ds, classes=classes, samples=samples, given_splits=given, unlabeled=unlabeled)


def _version(con, dataset: str) -> int:
    row = con.execute("SELECT MAX(id) AS v FROM label_history WHERE dataset = ?", (dataset,)).fetchone()
    return int(row["v"] or 0)


def relabel(store: LabelStore, dataset: str, labels_now: dict[str, str | None], label: str | None = None,
            exclude: bool = False, source: str = "manual", actor: str | None = None) -> int:
    """One action of a person on some images of a dataset, from any page: give them `label`, or exclude them.
    `labels_now`: each image's label as the page shows it (recorded as the old label the first time it changes).
    Returns the dataset's new label version."""
    if exclude:
        return store.exclude(dataset, list(labels_now), source=source, actor=actor)
    return store.set_labels(dataset, {p: label for p in labels_now}, source=source, original=labels_now, actor=actor)

