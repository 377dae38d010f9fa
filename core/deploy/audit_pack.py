"""The audit pack: what a quality engineer files with a model. One self-contained HTML report (plots and heatmaps
embedded, no network needed to read it) and a zip holding it with every file it cites: the config, the data's hash
and split, the training metrics, the test evaluation and confusion matrix, the calibration and decision rule (when
present), the near-duplicate and leakage report, the Grad-CAM audit (when run), sample heatmaps, the environment.
"""
from __future__ import annotations

import base64
import html
import io
import json
import platform
import time
import zipfile
from pathlib import Path

import numpy as np

from core.errors import UserError
from core.workspace.store import Run, Workspace, write_atomic

PACK_NAME = "audit-pack"
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


def _img_tag(png: bytes, alt: str, width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    return f'<img alt="{html.escape(alt)}"{w} src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(rows: list[dict]) -> str:
    if not rows:
        return "<p>(none)</p>"
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


def build_audit_pack(ws: Workspace, run_id: str, out: str | Path | None = None) -> dict:
    """Write the run's audit pack: `out` (default the run's folder)/audit-pack-RUN.html and .zip.
    Returns {"html", "zip", "files": names inside the zip}. UserError for a run that was never evaluated."""
    from core.deploy.export import dataset_hash
    from core.deploy.predict import get_predictor
    from core.explain.cam_audit import load_cam_audit
    from core.explain.leakage import run_duplicates
    run = ws.run(run_id)
    ev = run.evaluation()
    if ev is None or not run.best_path.exists():
        raise UserError(f"run {run_id} has no evaluation yet: train it to the end (or evaluate it) first")
    files: dict[str, bytes] = {}

    def cite(name: str, obj) -> str:
        files[name] = obj if isinstance(obj, bytes) else json.dumps(obj, indent=2).encode()
        return f'<a href="files/{html.escape(name)}"><code>files/{html.escape(name)}</code></a>'

    cfg = run.config()
    split = run.split()
    env = environment()
    data_hash = dataset_hash(run)
    leakage = run_duplicates(ws, run, by=("hash",))
    cam = load_cam_audit(run)
    calibration = run.calibration()
    rule = json.loads(run.rule_path.read_text()) if run.rule_path.exists() else None
    history = run.history()

    sections = []
    counts = {p: len(split.get(p, [])) for p in ("train", "val", "test")}
    sections.append(f"""<h2>Model and data</h2>
<p>Run <b>{html.escape(run.id)}</b> on dataset <b>{html.escape(str(split.get('dataset', '')))}</b>
({html.escape(str(split.get('source', '')))}); classes: {html.escape(', '.join(split['classes']))}.</p>
<p>Images: {counts['train']} training, {counts['val']} validation, {counts['test']} test. SHA-256 of the split (every
image's part, label and bytes): <code>{data_hash}</code>. Split: {cite('split.json', split)}.
Config: {cite('config.json', cfg.to_dict())}.</p>""")

    curves = _curves_png(history)
    if run.metrics_path.exists():
        files["metrics.csv"] = run.metrics_path.read_bytes()
    sections.append("<h2>Training</h2>" + (_img_tag(curves, "loss and accuracy curves") if curves else "")
                    + f"<p>{len(history)} epochs; best validation accuracy {ev.get('best_val_acc') or 0:.2%} "
                      f"(checkpoint of epoch {ev.get('checkpoint_epoch')}). Per epoch: "
                      + ('<a href="files/metrics.csv"><code>files/metrics.csv</code></a>' if "metrics.csv" in files
                         else "(no metrics file)") + ".</p>")

    classes = ev["classes"]
    cm = ev["confusion_matrix"]
    cm_rows = [{"true \\ predicted": c, **{p: cm[i][j] for j, p in enumerate(classes)}} for i, c in enumerate(classes)]
    sections.append(f"""<h2>Test evaluation</h2>
<p>On the {html.escape(ev['split'])} part ({ev['n']} images): accuracy <b>{ev['accuracy']:.2%}</b>, macro F1
{ev['macro_f1']:.4f}, loss {ev['loss']:.4f}. Evaluation: {cite('evaluation.json', ev)}.</p>
{_table(ev['per_class'])}<h3>Confusion matrix</h3>{_table(cm_rows)}""")

    if calibration:
        sections.append(f"""<h2>Calibration</h2><p>Temperature {calibration.get('temperature', 1.0):.3f} (fitted on the
validation part); expected calibration error on test {calibration.get('ece_before', float('nan')):.4f} before,
{calibration.get('ece_after', float('nan')):.4f} after. {cite('calibration.json', calibration)}.</p>""")
    else:
        sections.append("<h2>Calibration</h2><p>Not fitted for this run.</p>")
    rule_html = (f"<p>{cite('rule.json', rule)}</p><pre>{html.escape(json.dumps(rule, indent=2))}</pre>" if rule
                 else "<p>No decision rule saved: the top class is the answer.</p>")
    sections.append("<h2>Decision rule</h2>" + rule_html)

    leaks = [g for g in leakage["groups"] if g["straddles"]]
    sections.append(f"""<h2>Near-duplicates and leakage</h2>
<p>{leakage['n_groups']} near-duplicate groups by perceptual hash ({leakage['n_images_in_groups']} of
{leakage['n_images']} images); <b>{leakage['n_straddling']}</b> straddle two parts of the split (an image tested on
its near-twin inflates test accuracy); {leakage['n_labels_disagree']} disagree on the label.
Report: {cite('leakage.json', leakage)}.</p>""" + _table([
        {"members": "; ".join(f"{Path(m['path']).name} ({m['label']}, {m['part']})" for m in g["members"])}
        for g in leaks[:20]]))

    predictor = get_predictor(ws, run.id)
    heat_rows = []
    wrong = [r for r in _predictions(run) if r["label"] != r["predicted"]]
    picks = [(r["path"], r["predicted"], f"{r['label']} predicted {r['predicted']}") for r in wrong[:SAMPLE_HEATMAPS]]
    if cam:
        picks += [(i["path"], i["predicted"], f"{i['outside']:.0%} of attention outside the region")
                  for i in cam["flagged"][:SAMPLE_HEATMAPS - len(picks)] if i["path"] not in {p for p, _, _ in picks}]
    for k, (path, target, why) in enumerate(picks[:SAMPLE_HEATMAPS]):
        try:
            cam_view = predictor.explain(path, target=target)
        except Exception:  # noqa: BLE001 - a file gone since training: the pack says so instead of failing
            heat_rows.append(f"<figure><figcaption>{html.escape(Path(path).name)}: cannot be opened</figcaption></figure>")
            continue
        name = f"heatmaps/{k + 1:02d}-{Path(path).stem}.png"
        files[name] = _png(cam_view["overlay"])
        heat_rows.append(f"<figure>{_img_tag(files[name], name, 180)}<figcaption>{html.escape(Path(path).name)}: "
                         f"{html.escape(why)}</figcaption></figure>")
    if cam:
        cam_rows = [{"class": c["class"], "images": c["images"], "attention outside (mean)": c["mean_outside"],
                     "mostly outside": c["mostly_outside"]} for c in cam["per_class"]]
        sections.append(f"""<h2>Where the model looks (Grad-CAM audit)</h2><p>{cam['n']} {html.escape(cam['part'])}
images against {html.escape(cam['region_text'])}. {cite('cam_audit.json', cam)}.</p>{_table(cam_rows)}""")
    else:
        sections.append("<h2>Where the model looks (Grad-CAM audit)</h2><p>Not run for this run "
                        "(Evaluate page, or <code>python -m core cam-audit</code>).</p>")
    sections.append("<h2>Sample heatmaps</h2><div class=grid>" + ("".join(heat_rows) or "<p>(none)</p>") + "</div>")
    sections.append(f"<h2>Environment</h2>{_table([env])}<p>{cite('environment.json', env)}</p>")

    report = f"""<!doctype html><html><head><meta charset="utf-8"><title>Audit pack: run {html.escape(run.id)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}}table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:90%}}figure{{display:inline-block;margin:4px;width:190px;font-size:80%}}
.grid{{display:flex;flex-wrap:wrap}}code{{font-size:85%}}</style></head><body>
<h1>Audit pack: run {html.escape(run.id)}</h1><p>Written {env['written']} by the studio. Every figure below comes from the files
cited, which are in this pack's zip under <code>files/</code>.</p>{''.join(sections)}</body></html>"""

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

