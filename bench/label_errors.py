"""Finding planted label errors: the studio's k-fold job, read by cleanlab and by the studio's earlier scorer.

For each share of flipped labels and each seed, that share of a real image set's labels is flipped to another class
(chosen at random) through the label store, as a person's mistakes would be; the studio's cross-validation job
(core/studies/curation.py: every image predicted by a model trained on the other folds) gives out-of-sample
probabilities once, and both scorers read the same probabilities:

- cleanlab: find_label_issues flags, get_label_quality_scores orders (what the studio uses now);
- the studio's own confident-learning scores it used before cleanlab (kept here, and only here, for this comparison).

Per case: precision and recall of the flagged set, and precision of the top N of the queue (N = the planted errors:
the queue is what a person works through from the top). Sets: scikit-learn's handwritten digits (1,797 real scans,
10 classes, at 32 px: shipped with scikit-learn) and, with --elpv, ELPV's solar cells (2,624, two classes).

    python bench/label_errors.py                     # digits, 5/10/20% flipped, seeds 0,1,2
    python bench/label_errors.py --elpv --rates 0.1  # ELPV at 64 px

Prints one JSON document (per case and the mean per scorer) and the CPU it ran on.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402

# A quick recipe from scratch (as the Label page's "Find label errors" trains), without flips or turns: digits have
# an up and a left.
RECIPE = {"weights": "none", "optimizer": "adamw", "lr": 2e-3, "weight_decay": 5e-4, "schedule": "onecycle",
          "hflip": False, "vflip": False, "rot90": False, "normalization": "dataset", "split_seed": 42}


def old_scores(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The studio's scorer before cleanlab (core/studies/curation.py until December 2026): flagged when some other
    class j reaches its per-class threshold t_j (mean p_j over images labelled j) and beats the given label; ranked
    flagged first, then by normalized margin (p[given] - max other), lowest first. Returns (flagged, order)."""
    n, k = probs.shape
    self_conf = probs[np.arange(n), labels]
    others = probs.copy()
    others[np.arange(n), labels] = -np.inf
    margin = self_conf - others.max(1)
    thresholds = np.array([probs[labels == j, j].mean() if (labels == j).any() else 1.0 for j in range(k)])
    above = probs >= thresholds[None, :]
    above[np.arange(n), labels] = False
    flagged = above.any(1) & (margin < 0)
    return flagged, np.lexsort((margin, ~flagged))


def measure(flagged: np.ndarray, order: np.ndarray, wrong: set[int]) -> dict:
    hits = set(np.flatnonzero(flagged).tolist())
    top = set(order[:len(wrong)].tolist())
    return {"flagged": len(hits), "precision": round(len(hits & wrong) / max(1, len(hits)), 4),
            "recall": round(len(hits & wrong) / max(1, len(wrong)), 4),
            "top_n_precision": round(len(top & wrong) / max(1, len(wrong)), 4)}


def plant(ws, data: str, rate: float, seed: int) -> dict[str, str]:
    """Flip `rate` of the dataset's labels (to another class, at random) in the label store. Returns each flipped
    image's own (folder) label."""
    from core.data.labels import LabelStore
    from core.data.sources import load_dataset
    ds = load_dataset(data)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(ds.samples), int(round(rate * len(ds.samples))), replace=False)
    flips, own = {}, {}
    for i in chosen:
        s = ds.samples[int(i)]
        flips[s.path] = ds.classes[int(rng.choice([c for c in range(len(ds.classes)) if c != s.label]))]
        own[s.path] = ds.classes[s.label]
    LabelStore(ws).set_labels(ds.source, flips, source="import")
    return own


def unplant(ws, data: str, own: dict[str, str]) -> None:
    from core.data.labels import LabelStore
    from core.data.sources import load_dataset
    LabelStore(ws).set_labels(load_dataset(data).source, own, source="import")


def one_case(ws, data: str, rate: float, seed: int, folds: int, overrides: dict, save: str | None = None) -> dict:
    from core.config import TrainConfig
    from core.runs import life as runs
    from core.runs.life import Reporter
    from core.studies.curation import as_crossval, crossval, read_label_report
    own = plant(ws, data, rate, seed)
    wrong_paths = set(own)
    try:
        cfg = as_crossval(TrainConfig.from_dict({**RECIPE, **overrides, "data": data, "seed": seed}), folds)
        run = runs.prepare_run(ws, cfg)
        t0 = time.perf_counter()
        result = runs.execute(ws, run.id, lambda: crossval(ws, run, Reporter(), folds), Reporter())
        assert result["status"] == "done", result
        seconds = time.perf_counter() - t0
    finally:
        unplant(ws, data, own)
    report = read_label_report(run)
    classes = report["classes"]
    issues = sorted(report["issues"], key=lambda i: i["path"])
    rows = {r[0]: r for r in _oof(run)}
    probs = np.array([[float(x) for x in rows[i["path"]][2:]] for i in issues])
    labels = np.array([classes.index(i["given"]) for i in issues])
    wrong = {k for k, i in enumerate(issues) if i["path"] in wrong_paths}
    position = {i["path"]: k for k, i in enumerate(issues)}
    new_order = np.array([position[i["path"]] for i in report["issues"]])
    new_flagged = np.array([i["flagged"] for i in issues])
    old_flagged, old_order = old_scores(labels, probs)
    if save:
        np.savez_compressed(Path(save) / f"oof-{rate}-{seed}.npz", labels=labels, probs=probs,
                            wrong=np.array(sorted(wrong)))
    return {"rate": rate, "seed": seed, "planted": len(wrong), "images": len(issues),
            "out_of_fold_accuracy": round(float((probs.argmax(1) == labels).mean()), 4),
            "seconds": round(seconds, 1), "studio": measure(new_flagged, new_order, wrong),
            **cleanlab_rankings(labels, probs, wrong),
            "studio_before": measure(old_flagged, old_order, wrong),
            "noise_estimate_mislabeled_mean": round(float(np.mean([c["mislabeled"] for c in report["noise"]])), 4)}


def cleanlab_rankings(labels: np.ndarray, probs: np.ndarray, wrong: set[int]) -> dict:
    """cleanlab's flags, the queue ordered by each of its label quality scores (flagged first)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    flagged = find_label_issues(labels, probs, n_jobs=1)
    return {f"cleanlab_{method}": measure(flagged, np.lexsort((get_label_quality_scores(labels, probs, method=method),
                                                               ~flagged)), wrong)
            for method in ("self_confidence", "normalized_margin", "confidence_weighted_entropy")}


def _oof(run) -> list[list[str]]:
    import csv
    with open(run.dir / "oof.csv", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return list(csv.reader(fh))[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--elpv", action="store_true", help="ELPV's solar cells instead of scikit-learn's digits")
    ap.add_argument("--rates", default="0.05,0.1,0.2", help="shares of labels flipped")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=8, help="epochs per fold")
    ap.add_argument("--image-size", type=int, help="default 32 (digits) or 64 (ELPV)")
    ap.add_argument("--save", help="a folder for each case's out-of-fold probabilities (npz), to score again later")
    args = ap.parse_args()

    from levers import write_digits

    from _common import environment
    from core.models.device import describe_device, select_device
    from core.studies.curation import METHOD
    from core.workspace.store import Workspace
    rates = [float(r) for r in args.rates.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    size = args.image_size or (64 if args.elpv else 32)
    overrides = {"epochs": args.epochs, "image_size": size, "batch_size": 32}
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(Path(tmp) / "ws")
        if args.elpv:
            data = "elpv"
        else:
            data = str(write_digits(Path(tmp) / "digits", size=size))
        for rate in rates:
            for seed in seeds:
                cases.append(one_case(ws, data, rate, seed, args.folds, overrides, args.save))
                print(json.dumps(cases[-1]), file=sys.stderr, flush=True)
    scorers = [k for k in cases[0] if isinstance(cases[0][k], dict)]
    summary = {name: {k: round(float(np.mean([c[name][k] for c in cases])), 4)
                      for k in ("precision", "recall", "top_n_precision")} for name in scorers}
    for name in scorers:
        summary[name]["top_n_better_than_before_in"] = sum(
            c[name]["top_n_precision"] > c["studio_before"]["top_n_precision"] for c in cases)
    print(json.dumps({"benchmark": "label_errors", "data": "ELPV" if args.elpv else "scikit-learn digits",
                      "image_size": size, "folds": args.folds, "epochs": args.epochs, "recipe": RECIPE,
                      "studio_method": METHOD, "mean": summary, "cases": cases, **environment(),
                      "device": describe_device(select_device("auto"))}, indent=2))


if __name__ == "__main__":
    main()
