"""`evaluate`, `decide`, `learning-curve`, `label-errors`, `cam-audit`, `audit-pack`, `duplicates`: what a run got
right and wrong, and why."""
from __future__ import annotations

import json
import sys

from core.cli.output import Output
from core.cli.progress import ProgressBar
from core.config import ConfigError
from core.data.duplicates import DEFAULT_HASH_DISTANCE
from core.explain.neighbours import DEFAULT_SIMILARITY
from core.runs import life as runs
from core.workspace.store import Workspace


def cmd_evaluate(args, ws: Workspace) -> Output:
    from core.infer.evaluate import evaluate_run
    from core.models.checkpoint import CheckpointError
    run = ws.run(args.run)
    if not run.best_path.exists():
        raise CheckpointError(f"run {args.run} has no best checkpoint (no epoch finished)")
    m = evaluate_run(ws, run)
    return Output(m, lambda: evaluation_lines(run.id, m))


def evaluation_lines(run_id: str, m: dict) -> list[str]:
    width = max(len(c) for c in m["classes"]) + 2
    return [f"run {run_id}: {m['split']} split, {m['n']} images",
            f"accuracy {m['accuracy']:.4f}  loss {m['loss']:.4f}  macro F1 {m['macro_f1']:.4f}  "
            f"weighted F1 {m['weighted_f1']:.4f}",
            f"{'class':<{width}} precision  recall     f1  support",
            *(f"{r['class']:<{width}} {r['precision']:9.3f} {r['recall']:7.3f} {r['f1']:6.3f} {r['support']:8d}"
              for r in m["per_class"]),
            "confusion matrix (rows: true, columns: predicted):",
            *(f"  {c:<{width}} " + " ".join(f"{v:6d}" for v in row) for c, row in zip(m["classes"], m["confusion_matrix"])),
            f"calibration: temperature {m['temperature']:.3f} (fitted on validation), expected calibration error "
            f"{m['ece_before']:.4f} -> {m['ece_after']:.4f} on {m['split']}"]


def cmd_decide(args, ws: Workspace) -> Output:
    from core.decide.stored import decide_run
    from core.infer.evaluate import write_decisions
    run = ws.run(args.run)
    try:
        cost = json.loads(args.cost_matrix) if args.cost_matrix else None
    except json.JSONDecodeError:
        raise ConfigError("cost_matrix", 'must be JSON rows, cost[true][decided], e.g. "[[0,1],[10,0]]"') from None
    r = decide_run(run, args.positive, args.cost_miss, args.cost_false_alarm, cost, args.target_accuracy,
                   args.review_budget)
    write_decisions(run)
    return Output(r, lambda: decision_lines(run.id, r, args.positive))


def decision_lines(run_id: str, r: dict, positive: str | None) -> list[str]:
    t, a, part = r["test"]["rule"], r["test"]["argmax"], r["part"]
    lines = []
    if r["threshold"] is not None:
        lines.append(f"threshold: {positive} when p({positive}) >= {r['threshold']:.4f} (chosen on validation)")
    lines.append(f"{part} cost: {r['test_cost']:g} with the rule, {r['test_cost_argmax']:g} with argmax "
                 f"({r['test']['n']} images)")
    if r["test"]["n"]:
        lines.append(f"{part} accuracy {t['accuracy']:.4f}, precision {t['precision']:.4f}, recall {t['recall']:.4f} "
                     f"(argmax: {a['accuracy']:.4f}, {a['precision']:.4f}, {a['recall']:.4f})")
    band = r["band"]
    if band is None:
        lines.append("review band: " + ("none asked" if r["band_reachable"] else
                                        "the target accuracy is not reached on validation at any coverage"))
    elif band["none_needed"]:
        lines.append(f"review band: none needed, every validation image stays automatic; on {part}: accuracy "
                     f"{r['band_accuracy']:.4f}")
    else:
        what = (f"p({positive}) in [{band['p_low']:.4f}, {band['p_high']:.4f})" if "p_low" in band
                else f"confidence < {band['min_confidence']:.4f}")
        lines.append(f"review band: {what} goes to a person; on {part}: coverage {r['coverage']:.1%}, accuracy of "
                     f"the automatic decisions {r['band_accuracy']:.4f}" if r["band_accuracy"] is not None else
                     f"review band: {what}; on {part} every image goes to a person")
    lines.append(f"saved with run {run_id}: Predict, `core predict`, exports and the predictions CSV now decide with it")
    return lines


def cmd_learning_curve(args, ws: Workspace) -> Output | int:
    from core.studies.learning_curve import as_learning_curve, learning_curve, read_learning_curve
    cfg = as_learning_curve(ws.run(args.run).config(), args.run, epochs=args.epochs)
    run = runs.prepare_derived(ws, args.run, cfg)
    bar = ProgressBar(quiet=args.quiet, run=run)
    try:
        result = runs.execute(ws, run.id, lambda: learning_curve(ws, run, bar), bar)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 130
    if result["status"] == "failed":
        print(f"error: {result['error']}", file=sys.stderr)
        return 1
    lc = read_learning_curve(run) or {}
    return Output({"run_id": run.id, "status": result["status"], **lc},
                  lambda: [*lc.get("advice", ["stopped before the last fraction: no curve"]), run.id])


def cmd_label_errors(args, ws: Workspace) -> Output | int:
    """k-fold cross-validation of a run's recipe (or a quick one for --data), then cleanlab's reading of its
    out-of-sample probabilities: the likely label errors and the noise estimate per class (core/studies/curation.py)."""
    from core.config import TrainConfig
    from core.data.sources import load_dataset
    from core.studies.curation import as_crossval, crossval, crossval_config, describe_noise, read_label_report
    if (args.run is None) == (args.data is None):
        raise ConfigError("data", "give a run id (its dataset and recipe) or --data SOURCE, not both")
    if args.run:
        base = ws.run(args.run).config()
        cfg = TrainConfig.from_dict({**base.to_dict(), **({"epochs": args.epochs} if args.epochs else {})})
    else:
        cfg = crossval_config(args.data, len(load_dataset(args.data).samples), epochs=args.epochs or 8,
                              image_size=args.image_size)
    cfg = as_crossval(cfg, args.folds)
    run = runs.prepare_run(ws, cfg)
    bar = ProgressBar(quiet=args.quiet or args.json, run=run)
    try:
        result = runs.execute(ws, run.id, lambda: crossval(ws, run, bar, args.folds), bar)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 130
    if result["status"] != "done":
        print(f"error: {result.get('error', 'stopped before the last fold')}", file=sys.stderr)
        return 1
    report = read_label_report(run)
    flagged = [i for i in report["issues"] if i["flagged"]]
    doc = {"run_id": run.id, "flagged": len(flagged), "images": len(report["issues"]),
           **{k: report[k] for k in ("classes", "folds", "method", "noise", "joint", "confusion")},
           "issues": report["issues"] if args.all else flagged}

    def lines():
        out = [f"run {run.id}: {len(flagged)} likely label errors among {len(report['issues'])} images "
               f"({args.folds}-fold cross-validation, cleanlab), worst first"]
        out += [f"- {i['path']}: labelled {i['given']}, looks like {i['suggested']} "
                f"(label quality {i['label_quality']:.3f})" for i in flagged[:args.top]]
        if len(flagged) > args.top:
            out.append(f"  ... {len(flagged) - args.top} more (--top N, or --json)")
        return out + ["noise estimate: " + "; ".join(describe_noise(report["noise"]))]

    return Output(doc, lines)


def cmd_cam_audit(args, ws: Workspace) -> Output:
    from core.explain.cam_audit import Region, box_from, run_cam_audit, save_region, saved_region
    run = ws.run(args.run)
    source = run.config().data
    region = Region(None) if args.auto else Region(box_from(args.region)) if args.region else None
    if args.save_region and region is not None:
        save_region(ws, source, region)
    progress = None if (args.quiet or args.json) else (
        lambda done, total: print(f"\rGrad-CAM {done}/{total}", end="", file=sys.stderr, flush=True))
    result = run_cam_audit(ws, run, region or saved_region(ws, source), progress=progress)
    if progress:
        print(file=sys.stderr)

    def lines():
        out = [f"run {result['run_id']}: Grad-CAM of {result['n']} {result['part']} images against "
               f"{result['region_text']}"]
        out += [f"  {c['class']}: {c['mean_outside']:.0%} of the attention outside on average; "
                f"{c['mostly_outside']} of {c['images']} images mostly outside" for c in result["per_class"] if c["images"]]
        out += [f"- {item['outside']:.0%} outside: {item['path']} ({item['label']}, predicted {item['predicted']})"
                for item in result["flagged"][:args.top]]
        return out

    return Output({k: v for k, v in result.items() if k != "images" or args.all}, lines)


def cmd_audit_pack(args, ws: Workspace) -> Output:
    from core.deploy.audit_pack import build_audit_pack
    out = build_audit_pack(ws, args.run, args.out)
    return Output(out, lambda: [f"{out['html']}\n{out['zip']} ({len(out['files'])} files)"])


def cmd_duplicates(args, ws: Workspace) -> Output:
    from core.explain.leakage import run_duplicates
    report = run_duplicates(ws, ws.run(args.run), tuple(args.by.split(",")), args.hash_distance, args.similarity)
    return Output(report, lambda: duplicate_lines(report, args.all))


def duplicate_lines(report: dict, every_group: bool) -> list[str]:
    spans = ", ".join(f"{n} {k}" for k, n in sorted(report["straddling_by_parts"].items())) or "none"
    lines = [f"run {report['run_id']}: {report['n_groups']} near-duplicate groups ({report['n_images_in_groups']} of "
             f"{report['n_images']} images) by {' and '.join(report['by'])}; {report['n_straddling']} straddle two "
             f"parts of the split ({spans}); {report['n_labels_disagree']} disagree on the label"]
    for g in report["groups"]:
        if g["straddles"] or g["labels_disagree"] or every_group:
            flags = [w for w, on in (("LEAKS", g["straddles"]), ("LABELS DISAGREE", g["labels_disagree"])) if on]
            lines.append(f"- {' '.join(flags) or 'group'}: " + "; ".join(
                f"{m['path']} ({m['label']}, {m['part']})" for m in g["members"]))
    if report["n_straddling"]:
        lines.append("to split keeping groups together, train with --split-groups duplicates")
    return lines


def add_commands(add) -> None:
    p = add("evaluate", cmd_evaluate, "evaluate a run's best checkpoint on its test split")
    p.add_argument("run")
    p.add_argument("--json", action="store_true")
    p = add("decide", cmd_decide, "choose and save a decision rule for a run: a cost-minimizing threshold and a "
                                   "review band, chosen on validation and scored on test")
    p.add_argument("run")
    p.add_argument("--positive", help="the class a miss of which costs --cost-miss (two-class runs: the 'fail' class)")
    p.add_argument("--cost-miss", type=float, default=1.0, help="cost of calling a positive image negative")
    p.add_argument("--cost-false-alarm", type=float, default=1.0, help="cost of calling a negative image positive")
    p.add_argument("--cost-matrix", help="several classes: JSON list of rows, cost[true][decided] (overrides the two costs)")
    band = p.add_mutually_exclusive_group()
    band.add_argument("--target-accuracy", type=float,
                      help="send the least certain images to a person until the rest reach this accuracy (0-1)")
    band.add_argument("--review-budget", type=float, help="the largest share of images a person reviews (0-1)")
    p.add_argument("--json", action="store_true")
    p = add("learning-curve", cmd_learning_curve, "train a run's recipe on 25/50/75/100%% of its training images "
                                                  "and say how many more images each class needs")
    p.add_argument("run")
    p.add_argument("--epochs", type=int, help="epochs per fraction (default: the run's); fewer keeps it short")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true")
    p = add("label-errors", cmd_label_errors, "find likely label errors: k-fold cross-validation (every image predicted "
                                               "by a model that never saw it), read by cleanlab; prints the flagged "
                                               "images with the class they look like, and each class's estimated "
                                               "share of wrong labels",
            workspace=lambda a: "run" if a.run else True)
    p.add_argument("run", nargs="?", help="a run whose dataset (with today's labels) and recipe to use")
    p.add_argument("--data", help="a dataset (folder, CSV, zip or registered name) instead of a run: a quick recipe "
                                  "trained from scratch")
    p.add_argument("--folds", type=int, default=5, help="folds (2-10, default 5, as in the studio)")
    p.add_argument("--epochs", type=int, help="epochs per fold (default: the run's, or 8 with --data)")
    p.add_argument("--image-size", type=int, default=128, help="with --data: image size (default 128)")
    p.add_argument("--top", type=int, default=20, help="flagged images listed (default 20)")
    p.add_argument("--all", action="store_true", help="with --json: every image's scores, not only the flagged")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true")
    add_audit_commands(add)


def add_audit_commands(add) -> None:
    p = add("cam-audit", cmd_cam_audit, "Grad-CAM of a run's whole test part: the share of attention outside the "
                                          "region where the evidence should be, per class, and the images where "
                                          "the model looked mostly elsewhere", workspace="run")
    p.add_argument("run")
    p.add_argument("--region", help="x0,y0,x1,y1 in fractions of the image (default: the dataset's saved region, "
                                    "else each image's foreground)")
    p.add_argument("--auto", action="store_true", help="each image's foreground, found automatically")
    p.add_argument("--save-region", action="store_true", help="keep --region / --auto for this dataset")
    p.add_argument("--top", type=int, default=20, help="images listed (default 20)")
    p.add_argument("--all", action="store_true", help="with --json: every image's share, not only the flagged")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true")
    p = add("audit-pack", cmd_audit_pack, "one self-contained HTML report of a run and a zip of the files it cites "
                                            "(config, data hash and split, metrics, evaluation, calibration, rule, "
                                            "leakage, Grad-CAM audit, heatmaps, environment)", workspace="run")
    p.add_argument("run")
    p.add_argument("--out", help="folder for the two files (default: the run's folder)")
    p.add_argument("--json", action="store_true")
    p = add("duplicates", cmd_duplicates, "near-duplicate images of a run (by perceptual hash, and by the model's "
                                           "features) and the groups that straddle its train/val/test split",
            workspace="run")
    p.add_argument("run")
    p.add_argument("--by", default="hash", help="hash, features, or hash,features (features need the run's checkpoint)")
    p.add_argument("--hash-distance", type=int, default=DEFAULT_HASH_DISTANCE,
                   help=f"most differing bits of 64 for a near-duplicate (default {DEFAULT_HASH_DISTANCE})")
    p.add_argument("--similarity", type=float, default=DEFAULT_SIMILARITY,
                   help=f"least cosine similarity of features for a near-duplicate (default {DEFAULT_SIMILARITY})")
    p.add_argument("--all", action="store_true", help="list every group, not only those that leak or disagree")
    p.add_argument("--json", action="store_true")
