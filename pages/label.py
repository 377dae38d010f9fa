import os
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.data.images import ImageLoadError, load_array
from core.data.labels import LabelStore, relabel
from core.decide.stored import load_rule
from core.deploy.predict import get_predictor
from core.deploy.watch import review_queue
from core.explain.features import outliers
from core.studies.curation import (
    DEFAULT_FOLDS,
    crossval_config,
    describe_noise,
    export_dataset,
    latest_label_issues,
    least_confident,
    review_band,
)
from pages import _ui


@st.cache_data(max_entries=4, show_spinner="Predicting the pool…")
def _least_confident(model_id: str, pool: tuple) -> list[tuple[str, float]]:
    """Cached: predicting the pool is the slow part."""
    return least_confident(get_predictor(_ui.ws(), model_id), list(pool))


@st.cache_data(max_entries=4, show_spinner="Deciding the pool…")
def _review_band(model_id: str, pool: tuple, rule_mtime: int) -> list[tuple[str, float]]:
    """Cached per saved rule (its file's time): a new rule gives a new queue."""
    return review_band(get_predictor(_ui.ws(), model_id), list(pool))


def _noise_estimate(report: dict) -> None:
    """Which class is dirty, and into which: cleanlab's estimate beside the out-of-fold confusion matrix."""
    st.markdown("**Estimated label noise**: " + "; ".join(describe_noise(report["noise"])) + ".")
    classes = report["classes"]
    flips = np.array([[0.0 if a == b else c["into"].get(b, 0.0) for b in classes]
                      for a, c in zip(classes, report["noise"])])
    left, right = st.columns(2)
    for column, z, title, across, fmt in (
            (left, np.array(report["confusion"]), "Out-of-fold predictions (count)", "predicted", "%{z:d}"),
            (right, flips, "Estimated label flips (share of the given class)", "looks like", "%{z:.0%}")):
        fig = go.Figure(go.Heatmap(z=z, x=classes, y=classes, colorscale="Blues", texttemplate=fmt,
                                   hovertemplate="given %{y}<br>%{x}<br>%{z}<extra></extra>"))
        fig.update_layout(title=title, xaxis_title=across, yaxis_title="given label", yaxis_autorange="reversed",
                          height=220 + 40 * len(classes), margin=dict(l=10, r=10, t=40, b=10))
        column.plotly_chart(fig, key=f"noise-{across}")


st.title("Label")
ws = _ui.ws()
jm = _ui.manager()
store = LabelStore(ws)

datasets = _ui.require_datasets()
names = [d["name"] for d in datasets]
current = st.session_state.get("dataset")
name = st.selectbox("Dataset", names, index=names.index(current) if current in names else 0, key="label_dataset")
source = {d["name"]: d["source"] for d in datasets}[name]
raw = _ui.load_dataset_or_error(source)
if raw is None:
    st.stop()
ds = store.apply(raw)
key = raw.source
original = {s.path: raw.classes[s.label] for s in raw.samples}
effective = {s.path: ds.classes[s.label] for s in ds.samples}

c1, c2, c3, c4 = st.columns(4)
c1.metric("Labeled images", len(ds.samples))
c2.metric("Unlabeled", len(ds.unlabeled))
c3.metric("Changed labels", sum(1 for p, lbl in effective.items() if original.get(p) not in (None, lbl)))
c4.metric("Label version", store.version(key))

# --- the model that suggests labels ---------------------------------------------------------------
model_rows = [r for r in ws.list_runs() if ws.run(r["id"]).best_path.exists()]
model_id = None
if model_rows:
    by_id = {r["id"]: r for r in model_rows}
    same = [r["id"] for r in model_rows if r["dataset"] in (raw.name, name)] or [r["id"] for r in model_rows]
    model_id = st.selectbox("Model for suggestions and heatmaps", same, format_func=lambda i: _ui.run_label(by_id[i]),
                            key="label_model")

# --- the queue ----------------------------------------------------------------------------------------
sources = ["Unlabeled images", "Likely label errors", "Least confident predictions", "Review band", "Outliers"]
queue_kind = st.radio("Queue", sources, horizontal=True, key="queue_kind")
reviewed = st.session_state.setdefault("reviewed", set())

queue: list[dict] = []
if queue_kind == "Unlabeled images":
    queue = [{"path": p, "given": None} for p in ds.unlabeled]
    if not raw.unlabeled:
        st.caption("Put images waiting for labels in an `unlabeled/` folder inside the dataset folder.")
elif queue_kind == "Likely label errors":
    found = latest_label_issues(ws, key)
    if found:
        crossval_id, report = found
        issues = report["issues"]
        queue = [{"path": i["path"], "given": effective.get(i["path"]), "suggested": i["suggested"],
                  "score": i["label_quality"]} for i in issues if i["flagged"] and i["path"] in effective]
        st.caption(f"From cross-validation run {crossval_id}: {len(queue)} images that {report['method'].split(':')[0]} "
                   "flags as likely mislabeled (every image predicted by a model that never saw it), lowest label "
                   "quality first.")
        if report["noise"]:
            _noise_estimate(report)
        with st.expander(f"Ranked list ({len(issues)} images)"):
            st.dataframe(pd.DataFrame(issues)[["path", "given", "suggested", "label_quality", "normalized_margin",
                                               "self_confidence", "flagged"]], hide_index=True)
    with st.form("crossval"):
        st.write("Cross-validation trains a model on each of k folds and predicts the held-out images, so every image "
                 "gets a prediction from a model that never saw it. It runs as a background job.")
        f1, f2, f3 = st.columns(3)
        folds = f1.number_input("Folds", 2, 10, DEFAULT_FOLDS)
        epochs = f2.number_input("Epochs per fold", 1, 200, 8)
        size = f3.number_input("Image size", 32, 512, 128, step=16)
        if st.form_submit_button("Find label errors"):
            if jm.active() is not None:
                st.warning("A job is running; start this when it ends.")
            else:
                cfg = crossval_config(source, len(ds.samples), int(epochs), int(size))
                try:
                    rid = jm.submit_crossval(cfg, int(folds), request_id=uuid.uuid4().hex)
                    st.session_state["train_run"] = rid
                    st.success(f"Cross-validation {rid} started; follow it on the Train page.")
                except Exception as exc:  # config or dataset problems: said, not raised
                    st.error(str(exc))
elif model_id is None:
    st.info("Train a model first: its least confident predictions come first here.")
elif queue_kind == "Outliers":
    with st.spinner("Measuring each image against the class centres (the first time, the run's features are computed)…"):
        ranked = outliers(ws, ws.run(model_id))
    queue = [{"path": o["path"], "given": effective.get(o["path"]), "distance": o["distance"]}
             for o in ranked if o["far"] and o["path"] in effective]
    st.caption(f"{len(queue)} images farther from every class centre (in the model's features) than 95% of the "
               "validation images: odd shots, wrong files, another product in the folder. Farthest first.")
elif queue_kind == "Least confident predictions":
    pool = tuple((ds.unlabeled or [s.path for s in ds.samples])[:2000])
    ranked = _least_confident(model_id, pool)
    queue = [{"path": path, "given": effective.get(path), "confidence": prob} for path, prob in ranked]
else:
    model_run = ws.run(model_id)
    saved_rule = load_rule(model_run)
    if saved_rule is None or not saved_rule.has_band:
        st.info("This model has no review band: choose one in Evaluate → Decide (\"Send to a person\").")
    else:
        pool = tuple((ds.unlabeled or [s.path for s in ds.samples])[:2000])
        ranked = _review_band(model_id, pool, model_run.rule_path.stat().st_mtime_ns)
        queue = [{"path": path, "given": effective.get(path), "margin": m} for path, m in ranked]
        st.caption(f"{len(queue)} images the model's decision rule sends to a person, nearest the boundary first.")

todo = [q for q in queue if q["path"] not in reviewed]
done_n = len(queue) - len(todo)
st.progress(done_n / len(queue) if queue else 0.0, text=f"{done_n} of {len(queue)} reviewed")


def assign(path: str, label: str | None, how: str, exclude: bool = False) -> None:
    relabel(store, key, {path: original.get(path)}, label, exclude, source=how, actor=_ui.actor())
    reviewed.add(path)


if todo:
    item = todo[0]
    left, right = st.columns([3, 2])
    suggestions = []
    if model_id is not None:
        predictor = get_predictor(ws, model_id)
        try:
            out = predictor.explain(item["path"], top_k=3)
            left.image([out["rgb"], out["overlay"]], caption=["image", f"Grad-CAM for {out['label']}"], width=320)
            suggestions = out["top"]
        except ImageLoadError as exc:
            left.error(f"cannot open: {exc}")
    else:
        try:
            left.image(load_array(item["path"], (320, 320)))
        except ImageLoadError as exc:
            left.error(f"cannot open: {exc}")
    with right:
        st.markdown(f"`{Path(item['path']).name}`")
        st.write(f"Current label: **{item.get('given') or 'none'}**")
        if suggestions:
            st.caption("Model suggestions: " + ", ".join(f"{s['label']} {s['prob']:.0%}" for s in suggestions))
            for s in suggestions:
                if st.button(f"✓ {s['label']} ({s['prob']:.0%})", key=f"sug_{s['label']}"):
                    assign(item["path"], s["label"], "suggestion")
                    st.rerun()
        st.caption("Classes (keys 1-9):")
        cols = st.columns(3)
        for i, c in enumerate(ds.classes):
            if cols[i % 3].button(c, key=f"cls_{c}", shortcut=str(i + 1) if i < 9 else None):
                assign(item["path"], c, "manual")
                st.rerun()
        b1, b2 = st.columns(2)
        if b1.button("Skip", key="skip", shortcut="s"):
            reviewed.add(item["path"])
            st.rerun()
        if b2.button("Exclude", key="exclude", help="Blurry, ambiguous, not a part: left out of training."):
            assign(item["path"], None, "manual", exclude=True)
            st.rerun()
        new = st.text_input("New class", key="new_class")
        if st.button("Add class and assign", disabled=not new.strip()):
            assign(item["path"], new.strip(), "manual")
            st.rerun()
elif queue:
    st.success("Queue done.")

# --- history, undo, export ----------------------------------------------------------------------------
st.subheader("History")
h1, h2 = st.columns([1, 4])
if h1.button("Undo my last change", key="undo", help="Undoes your last change, not anyone else's, back to exactly "
                                                      "what was there before it"):
    entries = store.undo(key, actor=_ui.actor())
    reverted = [e for e in entries if not e["kept"]]
    for e in reverted:
        reviewed.discard(e["path"])
    kept = len(entries) - len(reverted)
    st.toast((f"Undid {len(reverted)} change(s)" if entries else "Nothing of yours to undo")
             + (f"; {kept} image(s) changed by someone since were left as they are" if kept else ""))
    st.rerun()
history = store.history(key, limit=100)
if history:
    last = history[0]
    h2.markdown(f"Last change: `{Path(last['path']).name}` {last['old_label'] or '-'} → **{last['new_label']}**"
                f"{' (excluded)' if last['new_excluded'] else ''} · {last['source']}"
                f"{' · undone' if last['undone'] else ''}")
    frame = pd.DataFrame(history)
    frame["when"] = pd.to_datetime(frame["at"], unit="s").dt.strftime("%Y-%m-%d %H:%M:%S")
    frame["file"] = frame["path"].map(lambda p: Path(p).name)
    frame["who"] = frame["actor"].fillna("")
    st.dataframe(frame[["when", "file", "old_label", "new_label", "new_excluded", "source", "who", "undone"]],
                 hide_index=True, key="history_table")
else:
    st.caption("No label changes yet.")

with st.expander("Export the curated dataset"):
    mode = st.radio("As", ["copy", "link", "csv"], horizontal=True,
                    format_func={"copy": "class folders (copies)", "link": "class folders (hard links)",
                                 "csv": "labels CSV"}.get)
    default = ws.root / "exports" / (f"{raw.name}-v{store.version(key)}" + (".csv" if mode == "csv" else ""))
    dest = st.text_input("Destination", str(default))
    if st.button("Export"):
        try:
            out = export_dataset(ds, dest, mode=mode)
            st.success(f"Wrote {out['images']} images to {out['path']}.")
        except (OSError, FileExistsError) as exc:
            st.error(str(exc))

line_queue = review_queue(ws)
with st.expander(f"Sent to review by the line ({len(line_queue)})", expanded=False):
    st.caption("Images a hot folder (`python -m core watch`) predicted and the decision rule sent to a person, newest "
               "first; each is linked under the workspace's review/ folder. To train on them, label them by copying "
               "them into a class folder (or the dataset's unlabeled/ folder, to label them here).")
    cols = st.columns(4)
    for i, item in enumerate(line_queue[:48]):
        probs = ", ".join(f"{c} {p:.2f}" for c, p in sorted(item["probs"].items(), key=lambda kv: -kv[1]))
        caption = f"{Path(item['path']).name}: {probs} ({item['model']})"
        if os.path.exists(item["path"]):
            cols[i % 4].image(item["path"], caption=caption)
        else:
            cols[i % 4].caption(caption + " - the file is gone")
