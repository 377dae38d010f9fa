"""The audit pack: what a quality engineer files with a model. One self-contained HTML report (plots and heatmaps
embedded, no network needed to read it) and a zip holding it with every file it cites: the config, the data's hash
and split, the training metrics, the test evaluation and confusion matrix, the calibration and decision rule (when
present), the near-duplicate and leakage report, the Grad-CAM audit (when run), sample heatmaps, the environment.
"""
from __future__ import annotations

import base64
import io
import json
import platform
import time
import zipfile
from pathlib import Path

import numpy as np

from core.errors import UserError
from core.workspace.files import write_atomic
from core.workspace.store import Run, Workspace

PACK_NAME = "audit-pack"
TEMPLATES = Path(__file__).parent / "templates"
SAMPLE_HEATMAPS = 6


def environment() -> dict:
    import PIL
    import torch
    import torchvision

    from core.models.device import cpu_name, describe_device
    return {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__, "pillow": PIL.__version__,
            "cpu": cpu_name(), "device": describe_device(), "written": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def _curves_png(history: list[dict]) -> bytes | None:
    if not history:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [int(h["epoch"]) for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), dpi=100)
    for ax, key, title in ((axes[0], "loss", "Loss"), (axes[1], "acc", "Accuracy")):
        for part in ("train", "val"):
            ax.plot(epochs, [float(h[f"{part}_{key}"]) for h in history], marker="o", ms=3,
                    label="training" if part == "train" else "validation")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


def _render(context: dict) -> str:
    import jinja2
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters.update(cell=_cell, pct=lambda v: f"{v:.2%}", f3=lambda v: f"{v:.3f}", f4=lambda v: f"{v:.4f}",
                       data_uri=lambda png: "data:image/png;base64," + base64.b64encode(png).decode())
    return env.get_template("audit_pack.html").render(**context, nan=float("nan"))


def build_audit_pack(ws: Workspace, run_id: str, out: str | Path | None = None) -> dict:
    """Write the run's audit pack: `out` (default the run's folder)/audit-pack-RUN.html and .zip.
    Returns {"html", "zip", "files": names inside the zip}. UserError for a run that was never evaluated."""
    run = ws.run(run_id)
    ev = run.evaluation()
    if ev is None or not run.best_path.exists():
        raise UserError(f"run {run_id} has no evaluation yet: train it to the end (or evaluate it) first")
    context, files = _facts(ws, run, ev)
    context["heatmaps"] = _heatmaps(ws, run, context["cam"], files)
    report = _render(context)
    out_dir = Path(out).expanduser() if out else run.dir
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path = out_dir / f"{PACK_NAME}-{run.id}.html"
    zip_path = out_dir / f"{PACK_NAME}-{run.id}.zip"
    try:
        write_atomic(html_path, lambda tmp: Path(tmp).write_text(report, encoding="utf-8"))
        write_atomic(zip_path, lambda tmp: _write_zip(tmp, report, files))
    except OSError as exc:
        raise UserError(f"cannot write the audit pack to {out_dir}: {exc.strerror or exc}") from None
    return {"html": str(html_path), "zip": str(zip_path), "files": sorted(["audit.html"] + [f"files/{n}" for n in files])}


def _facts(ws: Workspace, run: Run, ev: dict) -> tuple[dict, dict[str, bytes]]:
    """What the report says, and the files it cites (name -> bytes), each one the report's source for a figure."""
    from core.deploy.export import dataset_hash
    from core.explain.cam_audit import load_cam_audit
    from core.explain.leakage import run_duplicates
    split, env, history = run.split(), environment(), run.history()
    leakage, cam, calibration = run_duplicates(ws, run, by=("hash",)), load_cam_audit(run), run.calibration()
    rule = json.loads(run.rule_path.read_text()) if run.rule_path.exists() else None
    cited = {"split.json": split, "config.json": run.config().to_dict(), "evaluation.json": ev,
             "calibration.json": calibration, "rule.json": rule, "leakage.json": leakage, "cam_audit.json": cam,
             "environment.json": env}
    files = {name: json.dumps(obj, indent=2).encode() for name, obj in cited.items() if obj}
    if run.metrics_path.exists():
        files["metrics.csv"] = run.metrics_path.read_bytes()
    classes, cm = ev["classes"], ev["confusion_matrix"]
    context = {
        "run_id": run.id, "split": split, "env": env, "ev": ev, "calibration": calibration, "rule": rule,
        "rule_text": json.dumps(rule, indent=2) if rule else "", "leakage": leakage, "cam": cam,
        "data_hash": dataset_hash(run), "epochs": len(history), "curves": _curves_png(history),
        "has_metrics": "metrics.csv" in files,
        "counts": {p: len(split.get(p, [])) for p in ("train", "val", "test")},
        "confusion_rows": [{"true \\ predicted": c, **{p: cm[i][j] for j, p in enumerate(classes)}}
                           for i, c in enumerate(classes)],
        "leak_rows": [{"members": "; ".join(f"{Path(m['path']).name} ({m['label']}, {m['part']})" for m in g["members"])}
                      for g in [g for g in leakage["groups"] if g["straddles"]][:20]],
        "cam_rows": [{"class": c["class"], "images": c["images"], "attention outside (mean)": c["mean_outside"],
                      "mostly outside": c["mostly_outside"]} for c in cam["per_class"]] if cam else [],
    }
    return context, files


def _heatmaps(ws: Workspace, run: Run, cam: dict | None, files: dict[str, bytes]) -> list[dict]:
    """Grad-CAM overlays of the worst misclassified test images (then the audit's most off-region ones), each
    added to `files`; an image gone since training is listed as such instead of failing the pack."""
    from core.deploy.predict import get_predictor
    predictor = get_predictor(ws, run.id)
    wrong = [r for r in _predictions(run) if r["label"] != r["predicted"]]
    picks = [(r["path"], r["predicted"], f"{r['label']} predicted {r['predicted']}") for r in wrong[:SAMPLE_HEATMAPS]]
    if cam:
        picks += [(i["path"], i["predicted"], f"{i['outside']:.0%} of attention outside the region")
                  for i in cam["flagged"][:SAMPLE_HEATMAPS - len(picks)] if i["path"] not in {p for p, _, _ in picks}]
    out = []
    for k, (path, target, why) in enumerate(picks[:SAMPLE_HEATMAPS]):
        try:
            overlay = predictor.explain(path, target=target)["overlay"]
        except Exception:  # noqa: BLE001 - a file gone since training: the pack says so instead of failing
            out.append({"file": Path(path).name, "png": None})
            continue
        name = f"heatmaps/{k + 1:02d}-{Path(path).stem}.png"
        files[name] = _png(overlay)
        out.append({"file": Path(path).name, "name": name, "png": files[name], "why": why})
    return out


def _predictions(run: Run) -> list[dict]:
    """The evaluation's per-image rows (path, label, predicted, loss), worst loss first."""
    from core.infer.evaluate import read_predictions
    rows = [{"path": r["path"], "label": r["true"], "predicted": r["predicted"], "loss": r["loss"]}
            for r in read_predictions(run)]
    return sorted(rows, key=lambda r: -r["loss"])


def _write_zip(path, report: str, files: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("audit.html", report)
        for name, data in files.items():
            z.writestr(f"files/{name}", data)

