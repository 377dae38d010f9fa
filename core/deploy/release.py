"""Releases: a run made into an immutable, numbered model of a dataset, let through only by the gate.

    workspace/releases/<dataset>/<version>/   model.onnx (+ .card.json), rule.json, golden.json, golden.csv,
                                               manifest.json (who, when, the run, data hash, label and golden
                                               versions, the gate's report, each file's SHA-256); all read-only

Before a release is made, the candidate run is compared with the dataset's current release on the golden set
(core/decide/gate.py): significantly worse by McNemar, a class's recall down by more than the tolerance, or the
rule's cost up, and it is refused, unless forced with a reason. Every attempt (released, refused, forced) goes into
the ledger with the gate's report. The first release of a dataset has nothing to gate against and says so. This
module owns the `releases` and `release_ledger` tables.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import stat
import time
from pathlib import Path

import numpy as np

from core.data.golden import GoldenStore, sha256_file
from core.decide.gate import DEFAULT_ALPHA, DEFAULT_RECALL_TOLERANCE, Side, compare
from core.decide.rule import Rule
from core.decide.stored import load_rule
from core.errors import UserError
from core.workspace.files import write_json_atomic
from core.workspace.store import Run, Workspace, connect

SCHEMA = """
CREATE TABLE IF NOT EXISTS releases (
    name TEXT PRIMARY KEY,
    dataset TEXT NOT NULL,           -- the dataset's source
    version INTEGER NOT NULL,        -- 1, 2, ... per dataset
    run_id TEXT NOT NULL,
    created REAL NOT NULL,
    actor TEXT,
    dir TEXT NOT NULL,
    forced_reason TEXT,              -- set when the gate refused and a person let it through
    UNIQUE (dataset, version)
);
CREATE TABLE IF NOT EXISTS release_ledger (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset TEXT NOT NULL,
    run_id TEXT NOT NULL,
    at REAL NOT NULL,
    actor TEXT,
    outcome TEXT NOT NULL,           -- released | refused | forced | first
    release TEXT,                    -- its name when one was made
    reason TEXT,
    report TEXT NOT NULL             -- the gate's report (JSON)
);
"""
GALLERY_MAX = 24  # images of each kind (regressions, fixes) drawn with both models' heatmaps


class ReleaseError(UserError):
    """The run cannot be released as asked; the message says why. Nothing was made."""


class GateRefused(ReleaseError):
    """The gate found the candidate worse than the current release; `report` says how, `gallery` shows where."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def _connect(ws: Workspace) -> sqlite3.Connection:
    return connect(ws.db_path, SCHEMA)


def list_releases(ws: Workspace, dataset: str | None = None) -> list[dict]:
    """Every release, newest first, with its manifest."""
    con = _connect(ws)
    try:
        q, args = "SELECT * FROM releases", ()
        if dataset is not None:
            q, args = q + " WHERE dataset = ?", (dataset,)
        rows = [dict(r) for r in con.execute(q + " ORDER BY created DESC, version DESC", args)]
    finally:
        con.close()
    for r in rows:
        try:
            r["manifest"] = json.loads((Path(r["dir"]) / "manifest.json").read_text())
        except (OSError, ValueError):
            r["manifest"] = None
    return rows


def ledger(ws: Workspace, dataset: str | None = None, limit: int = 100) -> list[dict]:
    con = _connect(ws)
    try:
        q, args = "SELECT * FROM release_ledger", ()
        if dataset is not None:
            q, args = q + " WHERE dataset = ?", (dataset,)
        rows = [dict(r) for r in con.execute(q + " ORDER BY id DESC LIMIT ?", (*args, limit))]
    finally:
        con.close()
    for r in rows:
        r["report"] = json.loads(r["report"])
    return rows


def find_release(ws: Workspace, name: str) -> dict:
    """A release by name, or "latest": the newest release in the workspace."""
    found = list_releases(ws)
    if name == "latest":
        if not found:
            raise ReleaseError(f"no release in {ws.root}: make one with `python -m core release RUN_ID`")
        return found[0]
    for r in found:
        if r["name"] == name:
            return r
    raise ReleaseError(f"no release named {name!r} in {ws.root}" +
                       (f" (there are: {', '.join(r['name'] for r in found[:8])})" if found else ""))


def _golden_now(ws: Workspace, run: Run) -> tuple[dict, list[dict]]:
    """The run's golden-set score at the set's current version (scored again when its labels changed since)."""
    from core.infer.evaluate import read_golden, score_golden  # torch: not for a server that only reads releases
    dataset = run.split().get("source", "")
    summary, rows = read_golden(run)
    if summary is None or summary.get("version") != GoldenStore(ws).version(dataset):
        if not run.best_path.exists():
            raise ReleaseError(f"run {run.id} has no checkpoint to score on the golden set")
        summary = score_golden(ws, run)
        summary, rows = read_golden(run)
    return summary, rows


def gate_report(ws: Workspace, run_id: str, recall_tolerance: float = DEFAULT_RECALL_TOLERANCE,
                alpha: float = DEFAULT_ALPHA) -> dict:
    """The gate's report for releasing `run_id` now: against the dataset's current release on its golden set."""
    run = ws.run(run_id)
    row = ws.run_row(run_id)
    if row is None or row["status"] != "done":
        raise ReleaseError(f"run {run_id} is {row['status'] if row else 'unknown'}: only a finished run is released")
    if not run.eval_path.exists():
        raise ReleaseError(f"run {run_id} has not been evaluated: `python -m core evaluate {run_id}` first")
    dataset = run.split().get("source", "")
    golden = GoldenStore(ws)
    if not golden.images(dataset):
        raise ReleaseError(f"the dataset has no golden set: releases are gated on one. Make it with `python -m core "
                           f"golden --data {dataset} --from-test {run_id}` (or --folder DIR)")
    summary, rows = _golden_now(ws, run)
    if summary.get("trained_on"):
        raise ReleaseError(f"run {run_id} trained or validated on {summary['trained_on']} golden image(s) (it is older "
                           "than the golden set): train a new run, which leaves them out")
    current = next(iter(list_releases(ws, dataset)), None)
    base = {"dataset": dataset, "candidate": run_id, "golden_version": summary["version"],
            "candidate_golden": {k: summary.get(k) for k in ("n", "accuracy", "macro_f1")},
            "recall_tolerance": recall_tolerance, "alpha": alpha}
    if current is None:
        return {**base, "current": None, "refuse": False, "reasons": [],
                "first": "the first release of this dataset: there is nothing to gate against"}
    cur_run = ws.run(current["run_id"]) if (ws.runs_dir / current["run_id"]).is_dir() else None
    if cur_run is None:
        raise ReleaseError(f"the current release {current['name']}'s run {current['run_id']} is gone: it cannot be "
                           "scored on the golden set (--force --reason to release anyway)")
    cur_summary, cur_rows = _golden_now(ws, cur_run)
    classes = run.split()["classes"]
    if cur_run.split()["classes"] != classes:
        raise ReleaseError(f"the candidate's classes ({', '.join(classes)}) differ from the current release's: the "
                           "gate pairs decisions on the same classes (--force --reason to release anyway)")
    by_sha = {r["sha256"]: r for r in cur_rows}
    paired = [(r, by_sha[r["sha256"]]) for r in rows if r["sha256"] in by_sha]
    y = np.array([classes.index(r["true"]) for r, _ in paired], dtype=np.int64)
    probs = lambda rs: np.array([[float(r[f"p_{c}"]) for c in classes] for r in rs]).reshape(len(rs), len(classes))  # noqa: E731
    cur_rule = Rule.from_dict(json.loads((Path(current["dir"]) / "rule.json").read_text())) \
        if (Path(current["dir"]) / "rule.json").exists() else None
    cmp = compare(classes, y, Side(probs([c for _, c in paired]), cur_rule),
                  Side(probs([r for r, _ in paired]), load_rule(run)), recall_tolerance, alpha)
    gallery = {kind: [{"sha256": paired[i][0]["sha256"], "path": paired[i][0]["path"], "true": paired[i][0]["true"],
                       "current": paired[i][1]["predicted"], "candidate": paired[i][0]["predicted"]}
                      for i in cmp[kind]] for kind in ("regressions", "fixes")}
    return {**base, "current": {"name": current["name"], "run_id": current["run_id"],
                                "golden": {k: cur_summary.get(k) for k in ("n", "accuracy", "macro_f1")}},
            **cmp, "gallery": gallery}


def draw_gallery(ws: Workspace, report: dict, out_dir: Path, limit: int = GALLERY_MAX) -> list[str]:
    """PNG per gallery image: the image, the current release's Grad-CAM and the candidate's (each for the class it
    decided), side by side. Returns the files written."""
    if not report.get("gallery"):
        return []
    from PIL import Image

    from core.deploy.predict import get_predictor
    cur = get_predictor(ws, report["current"]["run_id"])
    cand = get_predictor(ws, report["candidate"])
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for kind in ("regressions", "fixes"):
        for i, g in enumerate(report["gallery"][kind][:limit]):
            try:
                a = cur.explain(g["path"], target=g["current"])
                b = cand.explain(g["path"], target=g["candidate"])
            except Exception as exc:  # noqa: BLE001  an image gone or unreadable since it was scored: say so, go on
                g["gallery_error"] = str(exc)
                continue
            strip = np.concatenate([a["rgb"], a["overlay"], b["overlay"]], axis=1)
            path = out_dir / f"{kind}-{i:03d}-true_{_safe(g['true'])}-current_{_safe(g['current'])}-candidate_" \
                             f"{_safe(g['candidate'])}.png"
            Image.fromarray(strip).save(path)
            g["png"] = str(path)
            written.append(str(path))
    return written


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:40]


def _record(ws: Workspace, dataset: str, run_id: str, actor, outcome: str, report: dict, release: str | None = None,
            reason: str | None = None) -> None:
    con = _connect(ws)
    try:
        with con:
            con.execute("INSERT INTO release_ledger (dataset, run_id, at, actor, outcome, release, reason, report) "
                        "VALUES (?,?,?,?,?,?,?,?)", (dataset, run_id, time.time(), actor, outcome, release, reason,
                                                     json.dumps(report)))
    finally:
        con.close()


def make_release(ws: Workspace, run_id: str, name: str | None = None, actor: str | None = None, force: bool = False,
                 reason: str | None = None, recall_tolerance: float = DEFAULT_RECALL_TOLERANCE,
                 alpha: float = DEFAULT_ALPHA, gallery: bool = True) -> dict:
    """Gate the run against the current release, then make it a release (ReleaseError / GateRefused otherwise).
    Returns the release's row with its manifest."""
    if force and not (reason or "").strip():
        raise ReleaseError("--force needs --reason TEXT: the ledger records why the gate was overridden")
    run = ws.run(run_id)
    dataset = run.split().get("source", "")
    if name is not None:
        _check_name(ws, name)  # before the gate's minutes, not after
    try:
        report = gate_report(ws, run_id, recall_tolerance, alpha)
    except ReleaseError as exc:
        if not force or ws.run_row(run_id) is None or not run.best_path.exists():
            raise
        report = {"dataset": dataset, "candidate": run_id, "refuse": True, "reasons": [str(exc)], "gallery": {}}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = ws.root / "releases" / _safe(ws.run_row(run_id)["dataset"])
    if report.get("gallery") and gallery:
        report["gallery_dir"] = str(root / f"gate-{stamp}-{run_id}")
        draw_gallery(ws, report, Path(report["gallery_dir"]))
    if report["refuse"] and not force:
        _record(ws, dataset, run_id, actor, "refused", report)
        raise GateRefused(f"the gate refuses run {run_id}: " + "; ".join(report["reasons"]), report)
    outcome = "forced" if report["refuse"] else ("first" if report.get("current") is None else "released")
    version = 1 + max((r["version"] for r in list_releases(ws, dataset)), default=0)
    name = name or f"{_safe(ws.run_row(run_id)['dataset'])}-v{version}"
    _check_name(ws, name)
    out = root / str(version)
    tmp = root / f".{version}.{os.getpid()}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_release(ws, run, tmp, name, version, actor, report, reason if report["refuse"] else None)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _freeze(out)
    con = _connect(ws)
    try:
        with con:
            con.execute("INSERT INTO releases (name, dataset, version, run_id, created, actor, dir, forced_reason) "
                        "VALUES (?,?,?,?,?,?,?,?)", (name, dataset, version, run_id, time.time(), actor, str(out),
                                                     reason if report["refuse"] else None))
    except sqlite3.IntegrityError:
        _unfreeze_and_remove(out)
        raise ReleaseError(f"release {name} (or version {version}) was made by someone else a moment ago: try again") \
            from None
    finally:
        con.close()
    _record(ws, dataset, run_id, actor, outcome, report, release=name, reason=reason)
    return find_release(ws, name)


def _check_name(ws: Workspace, name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise ReleaseError(f"release name {name!r}: letters, digits, '_', '.', '-' (64 at most), starting with a "
                           "letter or digit")
    if any(r["name"] == name for r in list_releases(ws)):
        raise ReleaseError(f"a release named {name!r} exists already: releases are immutable, choose another name")


def _write_release(ws: Workspace, run: Run, folder: Path, name: str, version: int, actor, report: dict,
                   forced_reason: str | None) -> None:
    from core.deploy.export import export_run
    folder.mkdir(parents=True)
    exported = export_run(ws, run.id, "onnx", folder / "model.onnx")
    for src, dst in ((run.rule_path, "rule.json"), (run.golden_path, "golden.json"),
                     (run.golden_predictions_path, "golden.csv"), (run.eval_path, "eval.json")):
        if src.exists():
            shutil.copyfile(src, folder / dst)
    row = ws.run_row(run.id)
    files = sorted(p.name for p in folder.iterdir())
    manifest = {"name": name, "version": version, "dataset": report.get("dataset"), "dataset_name": row["dataset"],
                "run_id": run.id, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "actor": actor,
                "data_sha256": exported["card"]["dataset_sha256"], "label_version": row.get("label_version"),
                "golden_version": report.get("golden_version"), "golden": report.get("candidate_golden"),
                "test_accuracy": row.get("test_acc"), "rule": load_rule(run).to_dict() if load_rule(run) else None,
                "gate": {k: v for k, v in report.items() if k != "gallery"}, "forced_reason": forced_reason,
                "files": {f: sha256_file(folder / f) for f in files}}
    write_json_atomic(folder / "manifest.json", manifest)


def _freeze(folder: Path) -> None:
    """Read-only files: a release is not edited, only superseded (the manifest's SHA-256s tell if one was)."""
    for p in folder.iterdir():
        p.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)


def _unfreeze_and_remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def verify_release(release: dict) -> list[str]:
    """The files of a release whose bytes are not the ones its manifest recorded (empty: intact)."""
    folder, bad = Path(release["dir"]), []
    for name, digest in ((release.get("manifest") or {}).get("files") or {}).items():
        try:
            if sha256_file(folder / name) != digest:
                bad.append(name)
        except OSError:
            bad.append(name)
    return bad


def release_model_path(release: dict) -> Path:
    return Path(release["dir"]) / "model.onnx"
