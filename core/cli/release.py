"""`golden`, `release`, `releases`: the images every run is scored on, and the models that ship."""
from __future__ import annotations

import getpass
import time

from core.cli.output import Output
from core.config import ConfigError
from core.workspace.store import Workspace


def _actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def cmd_golden(args, ws: Workspace) -> Output:
    from core.data.golden import GoldenStore, carve_from_test
    from core.data.sources import load_dataset
    ds = load_dataset(args.data)
    store = GoldenStore(ws)
    if args.from_test and args.folder:
        raise ConfigError("golden", "give --from-test RUN_ID or --folder DIR, not both")
    if args.from_test:
        run = ws.run(args.from_test)
        split = run.split()
        if split.get("source") != ds.source:
            raise ConfigError("from_test", f"run {run.id} is of {split.get('source')}, not {ds.source}")
        items = carve_from_test(split, args.share, args.seed)
        store.create(ds.source, items, f"{args.share:g} of run {run.id}'s test part, stratified, seed {args.seed}",
                     _actor())
    elif args.folder:
        given = load_dataset(args.folder)
        strange = sorted(set(given.classes) - set(ds.classes))
        if strange:
            raise ConfigError("folder", f"{args.folder} has classes the dataset does not: {', '.join(strange)}")
        store.create(ds.source, [(s.path, given.classes[s.label]) for s in given.samples], f"the folder {args.folder}",
                     _actor())
    elif args.relabel:
        image, _, label = args.relabel.rpartition("=")
        if not image or label not in ds.classes:
            raise ConfigError("relabel", f"give IMAGE=LABEL with LABEL one of {', '.join(ds.classes)}")
        store.relabel(ds.source, image, label, args.reason or "", _actor())
    info = store.describe(ds.source)
    return Output(info, lambda: golden_lines(info))


def golden_lines(info: dict) -> list[str]:
    if not info["n"]:
        return [f"{info['dataset']} has no golden set: make one with --from-test RUN_ID or --folder DIR"]
    c = info["created"]
    return [f"golden set of {info['dataset']}: {info['n']} images, version {info['version']} "
            f"({info['changes']} label change(s) since it was made)",
            "  " + ", ".join(f"{k} {v}" for k, v in info["counts"].items()),
            f"  made {time.strftime('%Y-%m-%d %H:%M', time.localtime(c['at']))} by {c['actor'] or '?'}: {c['reason']}"]


def cmd_release(args, ws: Workspace) -> Output:
    from core.deploy.release import GateRefused, make_release
    try:
        r = make_release(ws, args.run, args.name, _actor(), args.force, args.reason, args.recall_tolerance / 100,
                         args.alpha, gallery=not args.no_gallery)
    except GateRefused as exc:
        message, report = str(exc), exc.report
        return Output({"released": False, "error": message, "gate": report},
                      lambda: [f"refused: {message}", *gate_lines(report)], code=1)
    gate = r["manifest"]["gate"]
    return Output({"released": True, **r}, lambda: [
        f"released {r['name']} (version {r['version']}) from run {r['run_id']}: {r['dir']}", *gate_lines(gate)])


def gate_lines(g: dict) -> list[str]:
    if g.get("first"):
        return [f"gate: {g['first']}"]
    if "current_accuracy" not in g:
        return [f"gate: {reason}" for reason in g.get("reasons", [])]
    lines = [f"gate against {g['current']['name']} (run {g['current']['run_id']}) on {g['n']} golden images "
             f"(version {g['golden_version']}): accuracy {g['current_accuracy']:.4f} -> {g['candidate_accuracy']:.4f}, "
             f"{len(g['regressions'])} regression(s), {len(g['fixes'])} fix(es), McNemar p = {g['mcnemar_p']:.4f}",
             f"  cost per image {g['cost']['current']:.4f} -> {g['cost']['candidate']:.4f} ({g['cost']['priced_with']})"]
    lines += [f"  recall {c['class']}: {c['current_recall']:.3f} -> {c['candidate_recall']:.3f}" for c in g["per_class"]]
    lines += [f"  refused because {r}" for r in g["reasons"]]
    if g.get("gallery_dir") and (g["regressions"] or g["fixes"]):
        lines.append(f"  regression gallery (image | current's Grad-CAM | candidate's): {g['gallery_dir']}")
    return lines


def cmd_releases(args, ws: Workspace) -> Output:
    from core.deploy.release import list_releases
    rows = list_releases(ws)
    doc = [{k: r[k] for k in ("name", "dataset", "version", "run_id", "created", "actor", "dir", "forced_reason",
                              "manifest")} for r in rows]
    return Output(doc, lambda: release_table(rows) if rows else [f"no releases in {ws.root}"])


def release_table(rows: list[dict]) -> list[str]:
    def golden(r):
        g = (r["manifest"] or {}).get("golden") or {}
        return f"{g['accuracy']:.4f}" if g.get("accuracy") is not None else "-"
    return [f"{'release':<24} {'version':>7} {'run':<22} {'golden':>7} {'when':<16} by"] + [
        f"{r['name'][:24]:<24} {r['version']:>7} {r['run_id']:<22} {golden(r):>7} "
        f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(r['created'])):<16} {r['actor'] or '?'}"
        + (f"  (forced: {r['forced_reason']})" if r["forced_reason"] else "") for r in rows]


def add_commands(add) -> None:
    p = add("golden", cmd_golden, "make or show a dataset's golden set: images with frozen labels every run is "
                                  "scored on and no later run trains on")
    p.add_argument("--data", required=True, help="the dataset (folder, CSV or elpv)")
    p.add_argument("--from-test", metavar="RUN_ID", help="carve it from this run's test part, stratified")
    p.add_argument("--share", type=float, default=0.5, help="share of each class's test images (--from-test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--folder", metavar="DIR", help="a folder of class sub-folders whose images become the golden set")
    p.add_argument("--relabel", metavar="IMAGE=LABEL", help="change one golden label (IMAGE: a path or 8+ characters of "
                                                            "its SHA-256); needs --reason")
    p.add_argument("--reason", help="why the label changes (kept in the golden set's history)")
    p.add_argument("--json", action="store_true")
    p = add("release", cmd_release, "make a run an immutable release, if the gate lets it through (exit 1 if refused)")
    p.add_argument("run")
    p.add_argument("--name", help="default: DATASET-vN")
    p.add_argument("--recall-tolerance", type=float, default=2.0, metavar="POINTS",
                   help="the most any class's golden recall may drop, in points (default 2)")
    p.add_argument("--alpha", type=float, default=0.05, help="McNemar's significance level (default 0.05)")
    p.add_argument("--force", action="store_true", help="release even if the gate refuses (needs --reason)")
    p.add_argument("--reason", help="why the gate is overridden (recorded in the ledger)")
    p.add_argument("--no-gallery", action="store_true", help="skip drawing the regression gallery's heatmaps")
    p.add_argument("--json", action="store_true")
    p = add("releases", cmd_releases, "list releases")
    p.add_argument("--json", action="store_true")
