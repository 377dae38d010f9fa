"""The golden set: a dataset's images with frozen labels that no later run trains, validates or selects on, so that
every run of the dataset is scored on the same images and two runs' scores compare.

Images are known by the SHA-256 of their bytes, not their path: a renamed or moved file stays golden, and the same
picture copied elsewhere in the dataset is kept out of training too. The set is chosen once (carved from a run's test
part, stratified, or a folder of class sub-folders); its labels change only explicitly, each change a history entry
with who and why. Its version is 1 when made, plus one for each label changed since (0: no golden set).

Tables in the workspace's studio.db: `golden` (the set), `golden_history`, and `file_digests` (each file's SHA-256
by path, size and modification time, so that a dataset is hashed once, not once per run).
"""
from __future__ import annotations

import hashlib
import os
import random
import time
from collections import defaultdict
from dataclasses import dataclass, replace

from core.data.sources import Dataset
from core.errors import UserError
from core.workspace.store import connect

SCHEMA = """
CREATE TABLE IF NOT EXISTS golden (
    dataset TEXT NOT NULL,           -- the dataset's source, as the label store keys it
    sha256 TEXT NOT NULL,
    label TEXT NOT NULL,
    path TEXT NOT NULL,              -- where the image was last seen (the set is keyed by content, not by this)
    added REAL NOT NULL,
    PRIMARY KEY (dataset, sha256)
);
CREATE TABLE IF NOT EXISTS golden_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    old_label TEXT,                  -- NULL: the image joined the set
    new_label TEXT NOT NULL,
    at REAL NOT NULL,
    actor TEXT,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS file_digests (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL
);
"""


class GoldenError(UserError):
    """The golden set cannot be made or changed as asked; the message says why."""


@dataclass(frozen=True)
class GoldenImage:
    sha256: str
    label: str
    path: str  # where it is now (resolve) or was last seen


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read a MB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digests(ws, paths: list[str]) -> dict[str, str]:
    """SHA-256 of each readable file, from the workspace's record when its size and modification time are the
    ones recorded, else read afresh (and recorded). Unreadable files are left out."""
    out: dict[str, str] = {}
    stats = {}
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue
        stats[p] = (st.st_size, st.st_mtime_ns)
    con = connect(ws.db_path, SCHEMA)
    try:
        known = {}
        items = list(stats)
        for start in range(0, len(items), 500):  # SQLite's limit on the variables of one statement
            chunk = items[start:start + 500]
            rows = con.execute(f"SELECT * FROM file_digests WHERE path IN ({','.join('?' * len(chunk))})", chunk)
            known.update({r["path"]: r for r in rows})
        fresh = []
        for p, (size, mtime) in stats.items():
            r = known.get(p)
            if r is not None and r["size"] == size and r["mtime_ns"] == mtime:
                out[p] = r["sha256"]
                continue
            try:
                out[p] = sha256_file(p)
            except OSError:
                continue
            fresh.append((p, size, mtime, out[p]))
        if fresh:
            with con:
                con.executemany("INSERT OR REPLACE INTO file_digests (path, size, mtime_ns, sha256) VALUES (?,?,?,?)",
                                fresh)
    finally:
        con.close()
    return out


class GoldenStore:
    """The golden sets of a workspace, one per dataset; the only writer of its tables."""

    def __init__(self, ws):
        self.ws = ws
        connect(ws.db_path, SCHEMA).close()

    def images(self, dataset: str) -> list[GoldenImage]:
        con = connect(self.ws.db_path)
        try:
            rows = con.execute("SELECT sha256, label, path FROM golden WHERE dataset = ? ORDER BY label, path",
                               (dataset,)).fetchall()
        finally:
            con.close()
        return [GoldenImage(r["sha256"], r["label"], r["path"]) for r in rows]

    def version(self, dataset: str) -> int:
        con = connect(self.ws.db_path)
        try:
            row = con.execute("SELECT COUNT(*) AS n, SUM(old_label IS NOT NULL) AS changes FROM golden_history "
                              "WHERE dataset = ?", (dataset,)).fetchone()
        finally:
            con.close()
        return 1 + int(row["changes"] or 0) if row["n"] else 0

    def history(self, dataset: str, limit: int = 200) -> list[dict]:
        con = connect(self.ws.db_path)
        try:
            rows = con.execute("SELECT * FROM golden_history WHERE dataset = ? ORDER BY id DESC LIMIT ?",
                               (dataset, limit)).fetchall()
        finally:
            con.close()
        return [dict(r) for r in rows]

    def describe(self, dataset: str) -> dict:
        """What `core golden --data SOURCE` shows: the images, their labels per class, the version."""
        imgs = self.images(dataset)
        counts: dict[str, int] = defaultdict(int)
        for g in imgs:
            counts[g.label] += 1
        hist = self.history(dataset, limit=1_000_000)
        created = hist[-1] if hist else None
        return {"dataset": dataset, "version": self.version(dataset), "n": len(imgs), "counts": dict(sorted(counts.items())),
                "created": {"at": created["at"], "actor": created["actor"], "reason": created["reason"]} if created else None,
                "changes": sum(1 for h in hist if h["old_label"] is not None),
                "images": [{"sha256": g.sha256, "label": g.label, "path": g.path} for g in imgs]}

    def create(self, dataset: str, items: list[tuple[str, str]], reason: str, actor: str | None = None) -> int:
        """Make the dataset's golden set from (path, label) pairs, once. Returns its version. Images with the same
        bytes count once (a label conflict between copies is refused)."""
        if not items:
            raise GoldenError("no images to make a golden set of")
        digests = file_digests(self.ws, [p for p, _ in items])
        unreadable = [p for p, _ in items if p not in digests]
        if unreadable:
            raise GoldenError(f"{len(unreadable)} golden image(s) cannot be read, e.g. {unreadable[0]}")
        by_sha: dict[str, tuple[str, str]] = {}
        for path, label in items:
            sha = digests[path]
            if sha in by_sha and by_sha[sha][1] != label:
                raise GoldenError(f"{path} and {by_sha[sha][0]} are the same image with two labels "
                                  f"({label}, {by_sha[sha][1]}): a golden image has one label")
            by_sha.setdefault(sha, (path, label))
        now = time.time()
        con = connect(self.ws.db_path)
        try:
            with con:
                con.execute("BEGIN IMMEDIATE")
                have = con.execute("SELECT COUNT(*) AS n FROM golden WHERE dataset = ?", (dataset,)).fetchone()["n"]
                if have:
                    raise GoldenError(f"{dataset} has a golden set already ({have} images): it is chosen once, so "
                                      "that every run is scored on the same images; change a label with --relabel")
                con.executemany("INSERT INTO golden (dataset, sha256, label, path, added) VALUES (?,?,?,?,?)",
                                [(dataset, sha, label, path, now) for sha, (path, label) in by_sha.items()])
                con.executemany("INSERT INTO golden_history (dataset, sha256, old_label, new_label, at, actor, reason) "
                                "VALUES (?,?,NULL,?,?,?,?)",
                                [(dataset, sha, label, now, actor, reason) for sha, (_, label) in by_sha.items()])
        finally:
            con.close()
        return self.version(dataset)

    def relabel(self, dataset: str, image: str, label: str, reason: str, actor: str | None = None) -> int:
        """Change one golden image's label (`image`: its SHA-256, a prefix of it, or a path to its bytes), with a
        reason. Returns the new version."""
        if not reason.strip():
            raise GoldenError("a golden label changes only with a reason (--reason TEXT)")
        imgs = self.images(dataset)
        if os.path.exists(image):
            sha = file_digests(self.ws, [image]).get(image, "")
            match = [g for g in imgs if g.sha256 == sha]
        else:
            match = [g for g in imgs if g.sha256.startswith(image.lower())] if len(image) >= 8 else []
        if len(match) != 1:
            raise GoldenError(f"{image!r} names {'no' if not match else 'more than one'} image of {dataset}'s golden "
                              "set (give a path or at least 8 characters of its SHA-256)")
        old = match[0]
        if old.label == label:
            return self.version(dataset)
        con = connect(self.ws.db_path)
        try:
            with con:
                con.execute("UPDATE golden SET label = ? WHERE dataset = ? AND sha256 = ?", (label, dataset, old.sha256))
                con.execute("INSERT INTO golden_history (dataset, sha256, old_label, new_label, at, actor, reason) "
                            "VALUES (?,?,?,?,?,?,?)", (dataset, old.sha256, old.label, label, time.time(), actor, reason))
        finally:
            con.close()
        return self.version(dataset)

    def resolve(self, dataset: str, candidates: list[str]) -> tuple[list[GoldenImage], list[GoldenImage]]:
        """(found, missing): the golden images with a path where their bytes are now, looked for among `candidates`
        (the dataset's files) and where each was last seen. Paths that moved are recorded."""
        imgs = self.images(dataset)
        if not imgs:
            return [], []
        digests = file_digests(self.ws, list(dict.fromkeys([*candidates, *(g.path for g in imgs)])))
        where: dict[str, str] = {}
        for g in imgs:  # its last known place first, then any file with its bytes
            if digests.get(g.path) == g.sha256:
                where[g.sha256] = g.path
        for path, sha in digests.items():
            where.setdefault(sha, path)
        found = [replace(g, path=where[g.sha256]) for g in imgs if g.sha256 in where]
        missing = [g for g in imgs if g.sha256 not in where]
        last_seen = {g.sha256: g.path for g in imgs}
        moved = [(g.path, dataset, g.sha256) for g in found if g.path != last_seen[g.sha256]]
        if moved:
            con = connect(self.ws.db_path)
            try:
                with con:
                    con.executemany("UPDATE golden SET path = ? WHERE dataset = ? AND sha256 = ?", moved)
            finally:
                con.close()
        return found, missing

    def split_off(self, ds: Dataset) -> tuple[Dataset, int]:
        """The dataset without its golden images (any file with a golden image's bytes), for a new run's split, and
        how many files were taken out."""
        golden = {g.sha256 for g in self.images(ds.source)}
        if not golden:
            return ds, 0
        digests = file_digests(self.ws, [s.path for s in ds.samples])
        keep = [i for i, s in enumerate(ds.samples) if digests.get(s.path) not in golden]
        if len(keep) == len(ds.samples):
            return ds, 0
        new_index = {old: new for new, old in enumerate(keep)}
        given = {part: [new_index[i] for i in idx if i in new_index] for part, idx in ds.given_splits.items()}
        return replace(ds, samples=[ds.samples[i] for i in keep], given_splits=given), len(ds.samples) - len(keep)


def carve_from_test(split_json: dict, share: float, seed: int = 0) -> list[tuple[str, str]]:
    """(path, label) of a stratified share of a run's test part: per class, round(share x its test images), at least
    one, in a seeded shuffle."""
    if not 0 < share <= 1:
        raise GoldenError(f"--share must be in (0, 1], not {share}")
    rows = split_json.get("test") or []
    if not rows:
        raise GoldenError("that run has no test part to carve a golden set from")
    by_class: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        by_class[row[1]].append(row[0])
    rng = random.Random(seed)
    out = []
    for label in sorted(by_class):
        paths = sorted(by_class[label])
        rng.shuffle(paths)
        out += [(p, label) for p in paths[:max(1, round(share * len(paths)))]]
    return out
